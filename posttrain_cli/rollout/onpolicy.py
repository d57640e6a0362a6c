"""The on-policy loop grpo, ppo and distill share: sample a rollout, then take updates on it.

    loop = OnPolicy(ctx, engine, tokenizer, rows, prompts, rewards, pack, steps=steps,
                    aggregation=LOSS_AGGREGATIONS["token_mean"], ref=Reference(ctx))
    out = loop.train(rollout, loss_fn)   # rollout(step) -> (episodes, metrics); loss_fn(module, micro)
    out.update(loop.reward_trend())
    return loop.finish(out)              # the policy saved, verifier failures reported

An RL step is `mini_batches` x `passes` optimizer updates (ppo: ppo_epochs passes, grpo and
distill one). At a step's first update the loop calls the stage's `rollout(step)`: it samples
this rank's share of the step's prompts (`loop.sample`, from the prompt stream, through the
rollout/backend Sampler), scores the episodes and returns them with the step's metrics. The
loop shuffles them into mini-batches of micro-batches (seeded by step, pass and rank) and packs
one mini-batch per update; what an update computes is the stage's `loss_fn`, which reads
`token_logps` of the packed micro-batch.

When another engine samples (rollout.backend vllm: the sampler has `own_weights`), the loop
loads the policy's weights into it before each step's rollout (`sync`), and with `recompute` (grpo,
ppo) runs the trainer over the sampled tokens once, no grad: a PPO ratio then divides by the
trainer's own log-probs, and `behaviour` gives each token the truncated importance weight
min(p_trainer / p_sampler, is_cap) against what the engine really sampled from, so a numeric
difference between the engines cannot bias the gradient unseen (the step's metrics report the
ratio's mean and max). distill's loss weighs against the sampler itself (losses/distill.py).
With `fuse` (grpo) and a step that is one update (mini_batches 1, one pass) on a policy without
dropout, that separate pass is skipped: before the step's only update the trainer's log-probs
are those its own forward computes, detached (the same numbers), and the ratio's metrics come
from there: one forward less per step, as on-policy GRPO with hf needs none.

A checkpoint falls only between steps; the stage's part of it (`state`) holds the prompt
stream's cursor, the rollout metrics so far, the verifiers' counters and, once refreshed, the
reference's weights, so a resumed run draws, samples and shuffles as the uninterrupted one.
"""

from __future__ import annotations

import gc
import random
import shutil
import time
from typing import Callable

import torch

from posttrain_cli.data import preference as pref
from posttrain_cli.engine import deepspeed_engine as eng
from posttrain_cli.engine import dist, lora
from posttrain_cli.engine import loop as training
from posttrain_cli.engine.checkpoint import StageState
from posttrain_cli.engine.inference import frozen_causal_lm
from posttrain_cli.engine.lm_head import target_logps
from posttrain_cli.rollout import episodes as ep
from posttrain_cli.rollout.backend import policy_sampler


class PromptStream:
    """Prompts in seeded epoch shuffles, drawn in lock-step by every rank: a draw of k per rank
    takes the next k x world prompts and deals them round-robin."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.cursor = n, seed, 0
        self._epoch, self._order = -1, []

    def _at(self, i: int) -> int:
        epoch = i // self.n
        if epoch != self._epoch:
            self._order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order[i % self.n]

    def draw(self, per_rank: int) -> list[int]:
        world = dist.world()
        idx = [self._at(i) for i in range(self.cursor, self.cursor + per_rank * world)]
        self.cursor += per_rank * world
        return idx[dist.rank()::world]


class Reference:
    """The frozen reference for the KL term, refreshed to the policy every N steps (R1-Zero). A LoRA
    policy's reference, while it is the input model, is the policy with its adapter off (`engine`):
    no second model in memory (not after a PiSSA / OLoRA start, which changes the base)."""

    def __init__(self, ctx, policy=None):
        self.ctx = ctx
        self.refreshed = False  # True once the policy replaced the input model (ref_refresh_every)
        self.module = None
        path = ctx.models.get("ref_from") or ctx.input_model
        own = lora.AdapterOff(policy) if policy is not None and lora.is_peft(policy) and lora.base_is_input(policy) \
            and path == ctx.input_model else None
        if own is not None:
            ctx.info("reference: the policy with its LoRA adapter off (no second model)")
            self.module = own
        else:
            self.load(path)

    def load(self, path: str) -> None:
        if self.module is not None:
            # The old ZeRO-3 engine holds reference cycles: collected at a random later allocation,
            # its teardown on one rank could meet the other rank inside a collective (a 2-rank
            # ref_refresh run once aborted with "terminate called without an active exception").
            # Free it here, on every rank at the same step.
            self.module = None
            gc.collect()
            dist.barrier()
        self.module = frozen_causal_lm(path, self.ctx.run["model"], self.ctx.run["deepspeed"])

    @property
    def path(self):
        """Where a refreshed reference's weights are written."""
        return self.ctx.work_dir / "ref_refresh"

    def refresh(self, engine, tokenizer) -> None:
        eng.save_hf(engine, tokenizer, self.path, where=self.ctx.where())
        self.load(str(self.path))
        self.refreshed = True


class _RatioSums:
    """Importance ratios p_trainer / p_sampler summed on this rank; metrics() over every rank."""

    def __init__(self):
        self.n = self.total = self.over = 0.0
        self.top = 0.0

    @torch.no_grad()
    def add(self, trainer: torch.Tensor, sampler: torch.Tensor, cap: float | None) -> None:
        ratio = (trainer.detach().double().cpu() - sampler.detach().double().cpu()).exp()
        if ratio.numel():
            self.n += ratio.numel()
            self.total += float(ratio.sum())
            self.over += float((ratio > cap).sum()) if cap is not None else 0.0
            self.top = max(self.top, float(ratio.max()))

    def metrics(self) -> dict:
        n, total, over = dist.all_sum([self.n, self.total, self.over])
        return {"is_ratio_mean": total / max(n, 1.0), "is_ratio_max": dist.all_max(self.top),
                "is_truncated": over / max(n, 1.0)}


def _dropout(module) -> bool:
    """Whether any dropout is still on in the model (engine/deepspeed_engine.disable_dropout turns
    it off for RL): its training forward would then be random, and its log-probs not those of a
    separate pass."""
    return any((isinstance(m, torch.nn.Dropout) and m.p > 0)
               or (isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0)
               for m in module.modules())


def split_updates(episodes: list[ep.Episode], k: int, micro_size: int, seed: int) -> list[list[list[ep.Episode]]]:
    """A rank's rollout batch, shuffled, -> k mini-batches of micro-batches."""
    order = list(episodes)
    random.Random(seed).shuffle(order)
    per = len(order) // k
    minis = [order[i * per:(i + 1) * per] for i in range(k)]
    return [[m[j:j + micro_size] for j in range(0, len(m), micro_size)] for m in minis]


def micro_batch(episodes: list[ep.Episode], aggregation, max_len: int, *, boundaries: str, mask_dtype,
                device) -> dict:
    """Episodes -> one packed row; per completion token: old log-prob and `seq`. The weight is the
    loss aggregation's (sequences, or tokens for token_mean), which the loop sums over the batch."""
    micro = pref.pack_answers([e.seq for e in episodes], boundaries, mask_dtype, device)
    micro["old_logps"] = torch.tensor([lp for e in episodes for lp in e.logprobs], dtype=torch.float32, device=device)
    if episodes and episodes[0].trainer_logprobs is not None:
        micro["trainer_logps"] = torch.tensor([lp for e in episodes for lp in e.trainer_logprobs],
                                              dtype=torch.float32, device=device)
    micro["episodes"] = episodes
    micro["weight"] = aggregation(torch.zeros_like(micro["old_logps"]), micro["seq"], micro["n"], max_len)[1]
    return micro


def behaviour(micro: dict, is_cap: float | None,
              lp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the log-probs a PPO ratio divides by, a per-token loss weight or None): the trainer's
    log-probs and min(exp(trainer - sampler), is_cap) when another engine sampled, else the sampler's
    log-probs and no weight. The trainer's: recomputed after the rollout, or `lp` (this update's own
    forward, detached) where the loop fused that pass into the update (OnPolicy.fused)."""
    if "trainer_logps" in micro:
        old = micro["trainer_logps"]
    elif lp is not None:
        old = lp.detach()
    else:
        return micro["old_logps"], None
    if is_cap is None:
        return old, None
    return old, torch.exp(old - micro["old_logps"]).clamp(max=is_cap)


def token_logps(module, micro: dict, temperature: float, entropy: bool = False):
    """Log-prob of every completion token under softmax(logits / T) (the sampling distribution),
    and with `entropy` the distribution's entropy at each (no grad); through the head in chunks,
    without [tokens, vocab] logits (engine/lm_head.py)."""
    return target_logps(module, micro["inputs"], micro["targets"], micro["positions"],
                        temperature=temperature, entropy=entropy)


def reward_trend(ctx, history: list[dict]) -> dict:
    """The training reward's start and end: means over the first and last tenth of the steps."""
    tenth = max(1, len(history) // 10)
    start = sum(h["reward"] for h in history[:tenth]) / tenth
    end = sum(h["reward"] for h in history[-tenth:]) / tenth
    ctx.info(f"training reward {start:.3g} -> {end:.3g} (means of the first and last tenth of the steps)")
    return {"reward_start": start, "reward_end": end}


class OnPolicy:
    """One RL stage's prompts, sampler, update schedule and resumable state.

    `policy`: the module that samples (default the engine's; ppo's is the policy half of its
    policy-and-value engine). `ref`: the stage's Reference, if it has one (freed before the save).
    `rewards`: the verifiers (None: the stage scores otherwise), whose counters are resumed.
    `recompute`: the trainer's log-probs of what another engine sampled (grpo, ppo; see above)."""

    def __init__(self, ctx, engine, tokenizer, rows: list[dict], prompts: list[list[int]], rewards, pack: dict, *,
                 steps: int, aggregation: Callable, passes: int = 1, policy=None, ref: Reference | None = None,
                 recompute: bool = False, fuse: bool = False):
        self.ctx, self.cfg, self.engine, self.tokenizer = ctx, ctx.cfg, engine, tokenizer
        self.rows, self.prompts, self.rewards, self.pack = rows, prompts, rewards, pack
        self.names = rewards.names(rows) if rewards is not None else []  # the verifiers these rows use
        self.steps, self.passes, self.aggregation, self.ref = steps, passes, aggregation, ref
        self.updates_per_step = ctx.cfg["mini_batches"] * passes
        self.policy = policy if policy is not None else engine.module
        self.sampler = policy_sampler(ctx, self.policy, tokenizer)
        self.own_weights = getattr(self.sampler, "own_weights", False)
        self.recompute = recompute and self.own_weights
        # The trainer's log-probs from the step's one update instead of a pass of their own (above).
        self.fused = self.recompute and fuse and self.updates_per_step == 1 and not _dropout(self.policy)
        if self.fused:
            self.recompute = False
            ctx.info("one update a step: the trainer's log-probs for the importance weight come from that "
                     "update's forward (no separate pass)")
        self._ratio = _RatioSums()  # fused: this step's importance ratios, as the update sees them
        self.stream = PromptStream(len(prompts), ctx.seed)
        self.per_rank = ctx.arith["prompts_per_rank"]
        self.history: list[dict] = []  # each step's rollout metrics
        self.metrics: dict = {}  # this step's
        self._updates: list = []  # this step's mini-batches, each a list of micro-batches of episodes
        self._rollout: Callable | None = None

    def sample(self, per_rank: int | None = None) -> list[ep.Episode]:
        """num_generations completions of each of this rank's next prompts (prompts_per_rank, or
        per_rank: every rank draws and samples the same number, so generate calls match)."""
        n = self.per_rank if per_rank is None else per_rank
        eps = ep.sample(self.sampler, self.cfg, self.prompts, self.stream.draw(n), calls_for=n)
        if self.recompute:
            self._trainer_logprobs(eps)
        return eps

    @torch.no_grad()
    def _trainer_logprobs(self, episodes: list[ep.Episode]) -> None:
        """Each episode's trainer_logprobs: the policy's log-probs of its sampled tokens, a micro-batch
        at a time (every rank holds the same number of episodes, so ZeRO-3's gathers match)."""
        size = self.ctx.arith["micro_batch_size"]
        for i in range(0, len(episodes), size):
            chunk = episodes[i:i + size]
            micro = micro_batch(chunk, self.aggregation, self.cfg["max_new_tokens"], **self.pack)
            lp, _ = token_logps(self.policy, micro, self.cfg["temperature"])
            lp, seq = lp.float().cpu(), micro["seq"].cpu()
            for j, e in enumerate(chunk):
                e.trainer_logprobs = lp[seq == j].tolist()

    def importance_metrics(self, episodes: list[ep.Episode]) -> dict:
        """The step's importance ratio p_trainer / p_sampler over every rank's tokens: mean, max and
        the fraction above is_cap (truncated)."""
        sums = _RatioSums()
        sums.add(torch.tensor([lp for e in episodes for lp in e.trainer_logprobs]),
                 torch.tensor([lp for e in episodes for lp in e.logprobs]), self.cfg.get("is_cap"))
        return sums.metrics()

    def record_ratio(self, trainer_logps: torch.Tensor, micro: dict) -> None:
        """Fused: one micro-batch's trainer log-probs (its update's forward) against the sampler's."""
        self._ratio.add(trainer_logps, micro["old_logps"], self.cfg.get("is_cap"))

    def micro_batches(self, update: int) -> list[dict]:
        """engine/loop.train's view: this rank's micro-batches of one optimizer update."""
        cfg, k = self.cfg, self.cfg["mini_batches"]
        s, j = divmod(update, self.updates_per_step)
        if j == 0:
            t0 = time.perf_counter()
            if update > 0:  # the updates of step s - 1 (or a resumed checkpoint's weights)
                self._sync()
            synced = time.perf_counter() - t0
            episodes, self.metrics = self._rollout(s)
            self._ratio = _RatioSums()
            if self.recompute:
                self.metrics.update(self.importance_metrics(episodes))
            if self.own_weights:
                self.metrics["weight_syncs"] = float(self.sampler.syncs)
                self.metrics["sync_seconds"] = synced
                if hasattr(self.sampler, "sleep"):
                    self.sampler.sleep()  # GPUs: the engine's memory is the trainer's until the next sync
            self.history.append(self.metrics)
            size = self.ctx.arith["micro_batch_size"]
            self._updates = [mini for p in range(self.passes) for mini in
                             split_updates(episodes, k, size, self.ctx.seed * 7919 + s * 31 + p * 7 + dist.rank())]
        return [micro_batch(m, self.aggregation, cfg["max_new_tokens"], **self.pack) for m in self._updates[j]]

    def train(self, rollout: Callable, loss_fn: Callable, *, step_metrics: Callable | None = None,
              state: StageState | None = None) -> dict:
        """Every step: rollout(step), then its updates with loss_fn (engine/loop.train). step_metrics
        (default: the rollout's metrics) adds global figures to each update's row; `state` is the
        stage's own resumable state besides the loop's. -> the loop's metrics and rl_steps."""
        self._rollout = rollout
        more = step_metrics or (lambda _: self.metrics)

        def metrics_of(update: int) -> dict:
            if self.fused:  # every rank, after the step's one update: the ratios its forward saw
                self.metrics.update(self._ratio.metrics())
            return more(update)

        metrics = training.train(self.ctx, self.engine, total_steps=self.steps * self.updates_per_step,
                        micro_batches=self.micro_batches, loss_fn=loss_fn,
                        step_metrics=metrics_of, unit=self.updates_per_step,
                        state=self.state(state))
        self._sync()  # what samples after training (distill's held-out) sees the final weights
        return {**metrics, "rl_steps": self.steps}

    def _sync(self) -> None:
        if hasattr(self.sampler, "wake_up"):
            self.sampler.wake_up()
        self.sampler.sync(self.policy)

    def reward_trend(self) -> dict:
        return reward_trend(self.ctx, self.history)

    def finish(self, out: dict, *, part: str | None = None) -> dict:
        """The reference freed, the policy saved (`part`: ppo's policy half) -> the stage's result,
        with the verifiers' failures when there were any."""
        self.ref = None
        eng.save_hf(self.engine, self.tokenizer, self.ctx.work_dir / "model", part=part, where=self.ctx.where(),
                    final=True)
        self.engine = self.policy = self.sampler = None
        if self.rewards is not None and self.rewards.failures:
            out["verifier_failures"] = dict(self.rewards.failures)
        return {"metrics": out, "outputs": {"model": "model"}}

    def state(self, more: StageState | None = None) -> StageState:
        """The loop's part of a mid-stage checkpoint (cursor, history, verifier counters, whether and
        to what the reference was refreshed), plus the stage's own `more` (get / put only)."""

        def get() -> dict:
            return {"cursor": self.stream.cursor, "history": list(self.history),
                    "rewards": self.rewards.counts() if self.rewards is not None else None,
                    "refreshed": bool(self.ref is not None and self.ref.refreshed),
                    **(more.get() if more is not None else {})}

        def put(d: dict) -> None:
            self.stream.cursor = d["cursor"]
            self.history[:] = d["history"]
            if self.rewards is not None and d["rewards"] is not None:
                self.rewards.set_counts(d["rewards"])
            if self.ref is not None:
                self.ref.refreshed = d["refreshed"]
            if more is not None:
                more.put(d)

        def files(out) -> None:
            if self.ref is not None and self.ref.refreshed:
                shutil.copytree(self.ref.path, out / "ref")

        def load_files(src) -> None:
            ref = self.ref
            if ref is not None and ref.refreshed:
                # Back where a refresh writes it: the next checkpoint copies it from there.
                if dist.is_main():
                    shutil.rmtree(ref.path, ignore_errors=True)
                    shutil.copytree(src / "ref", ref.path)
                dist.barrier()
                ref.load(str(ref.path))

        return StageState(get, put, files, load_files)
