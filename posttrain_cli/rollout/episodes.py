"""What the on-policy RL stages (grpo, ppo) share: prompts, the prompt stream, sampling
and scoring a rollout batch, and per-token log-probs of a packed micro-batch.

An episode is one sampled completion: its prompt and sampled token ids, the sampling
log-probs, the reward and its parts. A rank samples its own prompts' groups whole,
so group statistics never cross ranks.
"""

from __future__ import annotations

import gc
import math
import random
from dataclasses import dataclass, field

import torch

from posttrain_cli.data import preference as pref
from posttrain_cli.data.chat import prompt_ids
from posttrain_cli.data.schemas import prompt_row
from posttrain_cli.data.sources import load_mixture
from posttrain_cli.engine import deepspeed_engine as eng
from posttrain_cli.engine import dist
from posttrain_cli.errors import UserError
from posttrain_cli.rollout import hf


@dataclass
class Episode:
    prompt: int  # index into the stage's prompts
    prompt_ids: list[int]
    ids: list[int]  # sampled tokens, EOS included when the completion stopped
    logprobs: list[float]
    text: str
    finish_reason: str
    reward: float = 0.0
    scores: dict = field(default_factory=dict)  # verifier -> raw score
    adv: float = 0.0
    index: int = 0  # position in its rollout batch (PPO's per-token tensors)

    @property
    def seq(self) -> tuple[list[int], list[bool]]:
        return self.prompt_ids + self.ids, [False] * len(self.prompt_ids) + [True] * len(self.ids)


def load_prompts(ctx, tokenizer, rewards) -> tuple[list[dict], list[list[int]]]:
    """Prompt rows (checked: each resolves to a verifier) and their token ids; prompts that leave
    no room for max_new_tokens within max_seq_len are dropped and counted."""
    cfg = ctx.cfg
    rows = load_mixture(cfg["data"], ctx.where("data"), prompt_row, ctx.seed, resolved_from=ctx.datasets)
    if rewards is not None:
        rewards.check_rows(rows)
    budget = cfg["max_seq_len"] - cfg["max_new_tokens"]
    if budget <= 0:
        raise UserError(f"{ctx.where('max_seq_len')}={cfg['max_seq_len']} leaves no room for a prompt before "
                        f"max_new_tokens={cfg['max_new_tokens']}")
    kept_rows, ids = [], []
    for row in rows:
        p = prompt_ids(tokenizer, row["messages"])
        if len(p) <= budget:
            kept_rows.append(row)
            ids.append(p)
    dropped = len(rows) - len(kept_rows)
    if not kept_rows:
        raise UserError(f"{ctx.where('data')}: every one of {len(rows)} prompts is longer than max_seq_len - "
                        f"max_new_tokens = {budget} tokens")
    ctx.info(f"{len(kept_rows)} prompts" + (f" ({dropped} longer than {budget} tokens dropped)" if dropped else ""))
    return kept_rows, ids


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


def sample(module, tokenizer, cfg: dict, prompts: list[list[int]], picks: list[int], *, synced: bool,
           calls_for: int) -> list[Episode]:
    """num_generations completions of each picked prompt (groups stay together). `calls_for` is the
    number of prompts the busiest rank samples, so every rank makes the same generate calls."""
    g, rb = cfg["num_generations"], cfg["rollout_batch_size"]
    flat = [p for p in picks for _ in range(g)]
    outs = hf.generate(module, tokenizer, [prompts[p] for p in flat], max_new_tokens=cfg["max_new_tokens"],
                       batch_size=rb, temperature=cfg["temperature"], top_p=cfg["top_p"], synced=synced,
                       calls=math.ceil(calls_for * g / rb), logprobs=True)
    return [Episode(p, prompts[p], o.sampled, o.logprobs, o.text, o.finish_reason) for p, o in zip(flat, outs)]


def score(episodes: list[Episode], rows: list[dict], rewards, weight: float = 1.0) -> None:
    """Each episode's reward: its verifiers' weighted scores, times `weight`."""
    if episodes:
        total, parts = rewards.score([e.text for e in episodes], [rows[e.prompt] for e in episodes])
        for e, r, s in zip(episodes, total, parts):
            e.reward, e.scores = weight * float(r), dict(s)


def no_eos_penalty(episodes: list[Episode], cfg: dict) -> None:
    """A completion cut at max_new_tokens gets reward `no_eos_penalty` (Tulu 3: -10) instead."""
    if cfg["no_eos_penalty"] is not None:
        for e in episodes:
            if e.finish_reason != "eos":
                e.reward = cfg["no_eos_penalty"]


def rollout_metrics(episodes: list[Episode], verifier_names: list[str]) -> dict:
    """Reward mean / std, accuracy per verifier, length and EOS rate over every rank's episodes."""
    r = [e.reward for e in episodes]
    sums = [len(r), sum(r), sum(x * x for x in r), sum(len(e.ids) for e in episodes),
            sum(e.finish_reason == "eos" for e in episodes)]
    for name in verifier_names:
        got = [e.scores[name] for e in episodes if name in e.scores]
        sums += [sum(got), len(got)]
    tot = dist.all_sum(sums)
    n = max(tot[0], 1.0)
    mean = tot[1] / n
    out = {"reward": mean, "reward_std": max(tot[2] / n - mean * mean, 0.0) ** 0.5,
           "response_length": tot[3] / n, "eos_rate": tot[4] / n}
    for i, name in enumerate(verifier_names):
        s, c = tot[5 + 2 * i], tot[6 + 2 * i]
        out[f"accuracy/{name}"] = s / c if c else 0.0
    return out


def reward_trend(ctx, history: list[dict]) -> dict:
    """The training reward's start and end: means over the first and last tenth of the steps."""
    tenth = max(1, len(history) // 10)
    start = sum(h["reward"] for h in history[:tenth]) / tenth
    end = sum(h["reward"] for h in history[-tenth:]) / tenth
    ctx.info(f"training reward {start:.3g} -> {end:.3g} (means of the first and last tenth of the steps)")
    return {"reward_start": start, "reward_end": end}


def micro_batch(episodes: list[Episode], aggregation, max_len: int, *, boundaries: str, mask_dtype,
                device) -> dict:
    """Episodes -> one packed row; per completion token: old log-prob and `seq`. The weight is the
    loss aggregation's (sequences, or tokens for token_mean), which the loop sums over the batch."""
    micro = pref.pack_answers([e.seq for e in episodes], boundaries, mask_dtype, device)
    micro["old_logps"] = torch.tensor([lp for e in episodes for lp in e.logprobs], dtype=torch.float32, device=device)
    micro["episodes"] = episodes
    micro["weight"] = aggregation(torch.zeros_like(micro["old_logps"]), micro["seq"], micro["n"], max_len)[1]
    return micro


def token_logps(module, micro: dict, temperature: float, entropy: bool = False):
    """Log-prob of every completion token under softmax(logits / T) (the sampling distribution),
    and with `entropy` the distribution's entropy at each (no grad)."""
    logits = module(**micro["inputs"], logits_to_keep=micro["positions"], use_cache=False).logits[0]
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    lsm = torch.log_softmax(logits, dim=-1)
    lp = lsm.gather(1, micro["targets"][:, None]).squeeze(1)
    if not entropy:
        return lp, None
    with torch.no_grad():
        ent = -(lsm.exp() * lsm).sum(-1)
    return lp, ent


def split_updates(episodes: list[Episode], k: int, micro_size: int, seed: int) -> list[list[list[Episode]]]:
    """A rank's rollout batch, shuffled, -> k mini-batches of micro-batches."""
    order = list(episodes)
    random.Random(seed).shuffle(order)
    per = len(order) // k
    minis = [order[i * per:(i + 1) * per] for i in range(k)]
    return [[m[j:j + micro_size] for j in range(0, len(m), micro_size)] for m in minis]


class Reference:
    """The frozen reference for the KL term, refreshed to the policy every N steps (R1-Zero)."""

    def __init__(self, ctx, model_cfg):
        self.ctx, self.model_cfg = ctx, model_cfg
        self.ds = eng.ds_config(ctx.run["deepspeed"], micro_batch_size=1, grad_accum=1, grad_clip=None)
        self.refreshed = False  # True once the policy replaced the input model (ref_refresh_every)
        self.load(ctx.models.get("ref_from") or ctx.input_model)

    def load(self, path: str) -> None:
        if getattr(self, "module", None) is not None:
            # The old ZeRO-3 engine holds reference cycles: collected at a random later allocation,
            # its teardown on one rank could meet the other rank inside a collective (a 2-rank
            # ref_refresh run once aborted with "terminate called without an active exception").
            # Free it here, on every rank at the same step.
            self.module = None
            gc.collect()
            dist.barrier()
        self.module, _ = eng.inference_module(eng.load_causal_lm(path, self.model_cfg, self.ds, train=False), self.ds)
        self.module.eval()

    @property
    def path(self):
        """Where a refreshed reference's weights are written."""
        return self.ctx.work_dir / "ref_refresh"

    def refresh(self, engine, tokenizer) -> None:
        eng.save_hf(engine, tokenizer, self.path)
        self.load(str(self.path))
        self.refreshed = True


def rl_state(stream: PromptStream, history: list, rewards, ref: Reference | None = None):
    """An RL stage's part of a mid-stage checkpoint: the prompt stream's position, the rollout
    metrics so far, the verifiers' counters and, once refreshed, the reference's weights."""
    import shutil

    from posttrain_cli.engine.checkpoint import StageState

    def get() -> dict:
        return {"cursor": stream.cursor, "history": list(history),
                "rewards": rewards.counts() if rewards is not None else None,
                "refreshed": bool(ref is not None and ref.refreshed)}

    def put(d: dict) -> None:
        stream.cursor = d["cursor"]
        history[:] = d["history"]
        if rewards is not None and d["rewards"] is not None:
            rewards.set_counts(d["rewards"])
        if ref is not None:
            ref.refreshed = d["refreshed"]

    def files(out) -> None:
        if ref is not None and ref.refreshed:
            shutil.copytree(ref.path, out / "ref")

    def load_files(src) -> None:
        if ref is not None and ref.refreshed:
            # Back where a refresh writes it: the next checkpoint copies it from there.
            if dist.is_main():
                shutil.rmtree(ref.path, ignore_errors=True)
                shutil.copytree(src / "ref", ref.path)
            dist.barrier()
            ref.load(str(ref.path))

    return StageState(get, put, files, load_files)
