"""Multi-teacher on-policy distillation (MOPD, MiMo-V2-Flash), with DeepSeek V4's full-vocabulary
reverse KL as an option.

    posttrain run recipe=tiny_mopd
    stages:
      student:
        kind: distill
        from: sft
        data: [{path: math.jsonl}, {path: code.jsonl}]   # prompt rows; `dataset` (or `domain`) routes
        teachers: {math: math_rl, code: code_rl}         # stages or model paths
        combine: route             # mixture: the teachers' weighted mixture (teacher_weights)
        kl: token                  # full: the exact reverse KL over the vocabulary
        adv_clip: 2.0
        is_cap: 2.0
        alpha: 0.0                 # > 0: + alpha x the group-centred verifier reward
        heldout: [{path: heldout.jsonl}]
        eval_every: 20

Each step the student samples `num_generations` completions of `prompts_per_step` prompts (split
over ranks, as grpo), every completion token is scored by the prompt's own teacher (`route`: the
row's `dataset` names a key of `teachers`; a micro-batch mixing domains runs each teacher on its
own rows) or by the teachers' mixture log sum_k w_k p_k (`mixture`), and the student takes
`mini_batches` updates on the per-token reverse KL (losses/distill.py: `token`, the sampled
log-ratio as a clipped advantage, or `full`). Teachers are loaded once, in inference mode, sharded
like the student (ZeRO-3: every rank calls every teacher's forward equally often; a rank without
rows for a teacher makes a dummy call). `token` reads only the sampled tokens' log-probs, so the
student and the teachers give them through the chunked head (engine/lm_head.py), never [tokens,
vocab]; `full` (and teachers padded to another vocabulary size) gets whole log-softmaxes.

Where we depart from the papers: teacher and student log-probs are both taken at the sampling
temperature (the distribution the student samples from); the loss is the mean over every
completion token of the batch (token_mean, as DAPO; there is no loss_agg key); `full` treats the
sampled prefix as given (as GKD). Metrics per update: reverse KL on the samples (log p_S - log p_T,
per token) overall and per teacher, the advantage mean, the fraction of clipped advantages and of
truncated importance weights, response length, and with alpha > 0 reward and accuracy. Held-out
prompts (`heldout`): the reverse KL of the student's own samples to the teachers, before training,
every `eval_every` steps and after (metrics.jsonl rows with `heldout_reverse_kl`; the final metrics
hold `heldout_reverse_kl_start` / `_end` and per teacher `heldout_reverse_kl_start/<key>`).
"""

from __future__ import annotations

import math
import time

import torch

from posttrain_cli.data import routing
from posttrain_cli.data.chat import prompt_ids
from posttrain_cli.data.preference import pack_answers
from posttrain_cli.data.schemas import open_prompt_row
from posttrain_cli.data.sources import load_mixture
from posttrain_cli.engine import deepspeed_engine as eng
from posttrain_cli.engine import dist
from posttrain_cli.engine.checkpoint import StageState
from posttrain_cli.engine.inference import frozen_causal_lm, load_tokenizer, packed_logits, synced
from posttrain_cli.engine.loop import total_steps
from posttrain_cli.errors import UserError
from posttrain_cli.losses import ADVANTAGES, LOSS_AGGREGATIONS
from posttrain_cli.losses.distill import DISTILL_LOSSES, at_targets, mixture_logprobs
from posttrain_cli.rollout import episodes as ep
from posttrain_cli.rollout.backend import shard
from posttrain_cli.rollout.onpolicy import OnPolicy, token_logps

# No loss_agg key for distill: every completion token of the batch weighs the same.
AGGREGATION = "token_mean"


def load_prompts(ctx, tokenizer, key: str, rewards=None) -> tuple[list[dict], list[list[int]]]:
    """Open prompt rows (ground_truth optional) of `key` (data or heldout) and their token ids;
    prompts leaving no room for max_new_tokens within max_seq_len are dropped and counted."""
    cfg = ctx.cfg
    rows = load_mixture(cfg[key], ctx.where(key), open_prompt_row, ctx.seed, resolved_from=ctx.datasets)
    if rewards is not None:
        rewards.check_rows(rows)
    if cfg["combine"] == "route":
        routing.check_routes(rows, cfg["teachers"], ctx.where())
    budget = cfg["max_seq_len"] - cfg["max_new_tokens"]
    if budget <= 0:
        raise UserError(f"{ctx.where('max_seq_len')}={cfg['max_seq_len']} leaves no room for a prompt before "
                        f"max_new_tokens={cfg['max_new_tokens']}")
    kept = [(row, ids) for row in rows if len(ids := prompt_ids(tokenizer, row["messages"])) <= budget]
    if not kept:
        raise UserError(f"{ctx.where(key)}: every one of {len(rows)} prompts is longer than max_seq_len - "
                        f"max_new_tokens = {budget} tokens")
    dropped = len(rows) - len(kept)
    ctx.info(f"{key}: {len(kept)} prompts" + (f" ({dropped} longer than {budget} tokens dropped)" if dropped else ""))
    return [r for r, _ in kept], [i for _, i in kept]


def log_softmax(module, micro: dict, temperature: float, width: int | None = None) -> torch.Tensor:
    """[completion tokens, vocab] log-probs of softmax(logits / T) at every completion position;
    `width`: over the first `width` token ids only (teacher and student embeddings padded to
    different sizes over one tokenizer)."""
    logits = packed_logits(module, micro).float()
    if width is not None:
        logits = logits[:, :width]
    return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)


def add_kl(sums: list[float], kl: torch.Tensor, route: list[int], seq: torch.Tensor) -> None:
    """Accumulate per-token reverse KL into sums = [kl, tokens] per teacher, then [kl, tokens] in all;
    route[i]: the teacher of episode i, seq[t]: the episode of token t."""
    kl, tok_route = kl.detach().cpu(), torch.tensor(route)[seq.cpu()]
    for k in range(len(sums) // 2 - 1):
        sel = tok_route == k
        sums[2 * k] += float(kl[sel].sum())
        sums[2 * k + 1] += float(sel.sum())
    sums[-2] += float(kl.sum())
    sums[-1] += float(kl.numel())


class Teachers:
    """The teachers in inference mode, sharded like the student. log_probs(micro, route) -> the
    teacher log-probs [completion tokens, vocab] each episode is distilled towards."""

    def __init__(self, ctx, tokenizer, pack: dict):
        cfg, model_cfg = ctx.cfg, ctx.run["model"]
        from transformers import AutoConfig

        self.keys = list(cfg["teachers"])
        self.route = cfg["combine"] == "route"
        self.temperature, self.pack = cfg["temperature"], pack
        weights = cfg["teacher_weights"]
        # Unlisted teachers weigh 0 once any weight is given (kinds/distill.py); equal without.
        self.weights = [float(weights.get(k, 0.0)) if weights else 1.0 for k in self.keys]
        self.synced = synced(ctx.run["deepspeed"])
        vocab = AutoConfig.from_pretrained(ctx.input_model, trust_remote_code=model_cfg["trust_remote_code"]).vocab_size
        # Checkpoints of one family pad their embeddings to different sizes over the same tokenizer
        # (Qwen2.5-7B: 152064 rows, 0.5B-3B and Qwen3: 151936): the distributions are then compared
        # over the tokenizer's ids, the rows past them being no token at all.
        self.width: int | None = None
        self.modules: list = []
        for key, w in zip(self.keys, self.weights):
            if not self.route and w == 0:
                self.modules.append(None)  # weight 0 in the mixture: never loaded
                continue
            path, where = ctx.models[f"teachers.{key}"], ctx.where(f"teachers.{key}")
            tok = load_tokenizer(path, model_cfg)
            t_vocab = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg["trust_remote_code"]).vocab_size
            if tok.get_vocab() != tokenizer.get_vocab() or min(t_vocab, vocab) < len(tokenizer):
                raise UserError(f"{where}: teacher {path} does not share the student's tokenizer ({len(tok)} tokens, "
                                f"vocab_size {t_vocab}; the student: {len(tokenizer)}, {vocab}); distillation compares "
                                f"log-probs token by token, so teacher and student need the same tokenizer")
            if t_vocab != vocab:
                self.width = len(tokenizer)
            self.modules.append(frozen_causal_lm(path, model_cfg, ctx.run["deepspeed"]))
        # A one-token answer for the calls a rank makes only to keep ZeRO-3's collectives in step.
        eos = tokenizer.eos_token_id
        self.dummy = pack_answers([([eos, eos], [False, True])], **pack)

    # True: log_probs() returns the log-probs of the sampled tokens only, [completion tokens], through
    # the chunked head (the loss reads nothing else); False: whole distributions.
    at_tokens = False

    def _forward(self, k: int, micro: dict) -> torch.Tensor:
        if self.at_tokens:
            return token_logps(self.modules[k], micro, self.temperature)[0]
        return log_softmax(self.modules[k], micro, self.temperature, self.width)

    @torch.no_grad()
    def log_probs(self, micro: dict, route: list[int]) -> torch.Tensor:
        """route[i]: the teacher index of the micro-batch's i-th episode (route mode)."""
        if not self.route:
            used = [k for k, m in enumerate(self.modules) if m is not None]
            return mixture_logprobs([self._forward(k, micro) for k in used], [self.weights[k] for k in used])
        out = None
        for k in range(len(self.modules)):
            rows = [i for i, r in enumerate(route) if r == k]
            if not rows:
                if self.synced:
                    self._forward(k, self.dummy)
                continue
            if len(rows) == len(route):
                out = self._forward(k, micro)
                continue
            lp = self._forward(k, pack_answers([micro["episodes"][i].seq for i in rows], **self.pack))
            if out is None:
                out = lp.new_empty(micro["targets"].shape[0], *lp.shape[1:])
            out[torch.isin(micro["seq"], torch.tensor(rows, device=micro["seq"].device))] = lp
        return out

    @torch.no_grad()
    def dummy_calls(self) -> None:
        """One forward of every loaded teacher (a rank with nothing to score, under ZeRO-3)."""
        for k, m in enumerate(self.modules):
            if m is not None:
                self._forward(k, self.dummy)


class HeldOut:
    """Reverse KL of the student's own samples on held-out prompts to their teachers (per token),
    sampled with a fixed seed each time (the same random numbers before and after training)."""

    def __init__(self, ctx, sampler, teachers: Teachers, rows, prompts, route, pack):
        self.ctx, self.cfg, self.sampler = ctx, ctx.cfg, sampler
        self.teachers, self.rows, self.prompts, self.route, self.pack = teachers, rows, prompts, route, pack
        self.history: list[dict] = []

    def measure(self, step: int) -> dict:
        """After `step` RL steps (logged as the update count, like the training rows)."""
        cfg, keys = self.cfg, self.teachers.keys
        t0 = time.perf_counter()
        mine, calls = shard(list(range(len(self.prompts))), cfg["rollout_batch_size"])
        devices = [dist.device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.ctx.seed * 7919 + dist.rank())
            outs = self.sampler.generate([self.prompts[i] for i in mine], max_new_tokens=cfg["max_new_tokens"],
                                         batch_size=cfg["rollout_batch_size"], temperature=cfg["temperature"],
                                         top_p=cfg["top_p"], calls=calls, logprobs=True)
        eps = [ep.Episode(i, self.prompts[i], o.sampled, o.logprobs, o.text, o.finish_reason)
               for i, o in zip(mine, outs)]
        m = self.ctx.arith["micro_batch_size"]
        chunks = [eps[i:i + m] for i in range(0, len(eps), m)]
        n_calls = int(dist.all_max(float(len(chunks)))) if self.teachers.synced else len(chunks)
        sums = [0.0] * (2 * len(keys) + 2)  # per teacher (kl, tokens), then all
        for c in range(n_calls):
            if c >= len(chunks):
                self.teachers.dummy_calls()
                continue
            micro = {**pack_answers([e.seq for e in chunks[c]], **self.pack), "episodes": chunks[c]}
            route = [self.route[e.prompt] for e in chunks[c]]
            t_lp = at_targets(self.teachers.log_probs(micro, route), micro["targets"])
            s_lp = torch.tensor([lp for e in chunks[c] for lp in e.logprobs], dtype=t_lp.dtype, device=t_lp.device)
            add_kl(sums, s_lp - t_lp, route, micro["seq"])
        tot = dist.all_sum(sums)
        out = {"heldout_reverse_kl": tot[-2] / max(tot[-1], 1.0)}
        if self.teachers.route:
            out.update({f"heldout_reverse_kl/{k}": tot[2 * i] / tot[2 * i + 1]
                        for i, k in enumerate(keys) if tot[2 * i + 1]})
        self.ctx.log_metrics({"step": step * cfg["mini_batches"], "rl_step": step, **out,
                              "heldout_seconds": time.perf_counter() - t0})
        per = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in out.items() if "/" in k)
        self.ctx.info(f"held-out reverse KL after {step} steps: {out['heldout_reverse_kl']:.4g} per token"
                      + (f" ({per})" if per else "") + f" on {len(self.prompts)} prompts")
        self.history.append(out)
        return out

    def summary(self) -> dict:
        start, end = self.history[0], self.history[-1]
        out = {}
        for key in start:
            name = key.replace("heldout_reverse_kl", "", 1)  # "" or "/add"
            out[f"heldout_reverse_kl_start{name}"] = start[key]
            out[f"heldout_reverse_kl_end{name}"] = end[key]
        return out


def rollout(loop: OnPolicy) -> tuple[list[ep.Episode], dict]:
    """This rank's share of a step's samples; with alpha > 0, scored and given group-centred
    outcome advantages."""
    cfg, t0 = loop.cfg, time.perf_counter()
    eps = loop.sample()
    if loop.rewards is not None:
        ep.score(eps, loop.rows, loop.rewards)
        r = torch.tensor([e.reward for e in eps], dtype=torch.float64).view(-1, cfg["num_generations"])
        for e, a in zip(eps, ADVANTAGES["centered"](r).view(-1).tolist()):
            e.adv = a
    metrics = ep.rollout_metrics(eps, loop.names)
    if loop.rewards is None:  # nothing scored
        for key in ("reward", "reward_std"):
            del metrics[key]
    metrics["rollout_seconds"] = time.perf_counter() - t0
    return eps, metrics


def _trend(history: list[float]) -> tuple[float, float]:
    """Means of the first and last tenth, NaN (no tokens that step) left out."""
    tenth = max(1, len(history) // 10)

    def mean(xs):
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs) if xs else float("nan")

    return mean(history[:tenth]), mean(history[-tenth:])


def kl_trend(ctx, kl_history: list[dict]) -> dict:
    """The training reverse KL's start and end (overall and per teacher), as reward_trend."""
    out = {}
    for name in kl_history[0]:
        suffix = "" if name == "all" else "/" + name.split("/", 1)[1]
        start, end = _trend([h[name] for h in kl_history])
        out[f"reverse_kl_start{suffix}"], out[f"reverse_kl_end{suffix}"] = start, end
        if suffix:
            out[f"reverse_kl{suffix}"] = end  # the loop's tail mean, without the NaN of empty updates
    ctx.info(f"training reverse KL {out['reverse_kl_start']:.4g} -> {out['reverse_kl_end']:.4g} per token "
             f"(means of the first and last tenth of the updates)")
    return out


def run(ctx) -> dict:
    from posttrain_cli.rewards.dispatch import Rewards

    cfg = ctx.cfg
    tokenizer = load_tokenizer(ctx.input_model, ctx.run["model"])
    rewards = Rewards(cfg, warn=ctx.info, where=ctx.where()) if cfg["alpha"] > 0 else None
    rows, prompts = load_prompts(ctx, tokenizer, "data", rewards)
    held_rows, held_prompts = load_prompts(ctx, tokenizer, "heldout") if cfg["heldout"] else ([], [])
    keys, route_mode = list(cfg["teachers"]), cfg["combine"] == "route"

    def routes(rs: list[dict]) -> list[int]:
        return [keys.index(routing.teacher_key(r, keys, ctx.where())) if route_mode else 0 for r in rs]

    route, held_route = routes(rows), routes(held_rows)
    if route_mode:
        ctx.info("prompts per teacher: " + ", ".join(f"{k} {route.count(i)}" for i, k in enumerate(keys)))
    steps = total_steps(cfg, len(prompts), ctx.where(), "prompts", "prompts_per_step")
    engine, pack = eng.train_policy(ctx, steps * cfg["mini_batches"])
    teachers = Teachers(ctx, tokenizer, pack)
    agg, loss_kind = LOSS_AGGREGATIONS[AGGREGATION], DISTILL_LOSSES[cfg["kl"]]
    # A loss that reads only the sampled tokens' log-probs gets them through the chunked head, for the
    # student and every teacher; one that reads whole distributions (kl: full), or teachers whose
    # embeddings are padded differently (compared over the tokenizer's ids only), gets [N, V].
    teachers.at_tokens = at_tokens = not getattr(loss_kind, "needs_distribution", True) and teachers.width is None
    loop = OnPolicy(ctx, engine, tokenizer, rows, prompts, rewards, pack, steps=steps, aggregation=agg)
    heldout = HeldOut(ctx, loop.sampler, teachers, held_rows, held_prompts, held_route, pack) \
        if held_prompts else None
    per_teacher = route_mode and len(keys) > 1
    sums = [0.0] * (2 * len(keys) + 2)  # this update's reverse KL and tokens per teacher, then in all (add_kl)
    kl_history: list[dict] = []

    def step_rollout(s: int) -> tuple[list[ep.Episode], dict]:
        # Step 0 inside the loop, so a resumed run does not measure (and log) it again.
        if heldout is not None and (s == 0 or (cfg["eval_every"] and s % cfg["eval_every"] == 0)):
            heldout.measure(s)
        return rollout(loop)

    def loss_fn(module, micro) -> tuple:
        """One micro-batch of an update: the student's reverse KL to each episode's teacher (`kl`),
        token mean; per-teacher KL sums for the update's row."""
        seq, n = micro["seq"], micro["n"]
        student = token_logps(module, micro, cfg["temperature"])[0] if at_tokens else \
            log_softmax(module, micro, cfg["temperature"], teachers.width)
        episode_route = [route[e.prompt] for e in micro["episodes"]]
        teacher = teachers.log_probs(micro, episode_route)
        outcome = torch.tensor([e.adv for e in micro["episodes"]], dtype=student.dtype, device=student.device)[seq]
        token_loss, stats = loss_kind(student, teacher, micro["targets"], micro["old_logps"], outcome,
                                      adv_clip=cfg["adv_clip"], is_cap=cfg["is_cap"], alpha=cfg["alpha"])
        loss, _ = agg(token_loss, seq, n, cfg["max_new_tokens"])
        with torch.no_grad():
            extra = {name: float(agg(v, seq, n, cfg["max_new_tokens"])[0]) for name, v in stats.items()}
            add_kl(sums, stats["reverse_kl"], episode_route, seq)
        return loss, extra

    def step_metrics(_update: int) -> dict:
        tot = dist.all_sum(sums)
        sums[:] = [0.0] * len(sums)
        row = {f"reverse_kl/{key}": tot[2 * i] / tot[2 * i + 1] if tot[2 * i + 1] else float("nan")
               for i, key in enumerate(keys)} if per_teacher else {}
        kl_history.append({"all": tot[-2] / max(tot[-1], 1.0), **row})
        return {**loop.metrics, **row}

    def put(d: dict) -> None:
        kl_history[:] = d["kl_history"]
        if heldout is not None:
            heldout.history[:] = d["heldout"]

    ctx.info(f"{steps} steps x {cfg['prompts_per_step']} prompts x {cfg['num_generations']} completions "
             f"({ctx.arith['prompts_per_rank']} prompts per rank), {cfg['mini_batches']} update(s) per step; teachers "
             f"{', '.join(keys)} ({cfg['combine']}), reverse KL {cfg['kl']}, adv_clip {cfg['adv_clip']:g}, "
             f"is_cap {cfg['is_cap']}, alpha {cfg['alpha']:g}, ZeRO-{ctx.run['deepspeed']['zero_stage']}")
    own = StageState(lambda: {"kl_history": list(kl_history),
                              "heldout": list(heldout.history) if heldout is not None else None}, put)
    out = loop.train(step_rollout, loss_fn, step_metrics=step_metrics, state=own)
    out.update(kl_trend(ctx, kl_history))
    if rewards is not None:
        out.update(loop.reward_trend())
    if heldout is not None:
        heldout.measure(steps)
        out.update(heldout.summary())
    teachers = heldout = None
    return loop.finish(out)
