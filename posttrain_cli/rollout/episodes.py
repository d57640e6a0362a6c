"""Episodes of the on-policy stages (grpo, ppo, distill): the prompts, sampling a batch of
completions through the rollout/backend Sampler, scoring them, and the rollout's metrics.
The update schedule that trains on them is rollout/onpolicy.py.

An episode is one sampled completion: its prompt and sampled token ids, the sampling
log-probs, the reward and its parts. A rank samples its own prompts' groups whole,
so group statistics never cross ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from posttrain_cli.data.chat import prompt_ids
from posttrain_cli.data.schemas import prompt_row
from posttrain_cli.data.sources import load_mixture
from posttrain_cli.engine import dist
from posttrain_cli.errors import UserError


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
    # The trainer's own log-probs of `ids` when another engine sampled them (rollout/onpolicy.py).
    trainer_logprobs: list[float] | None = None

    @property
    def old_logprobs(self) -> list[float]:
        """The log-probs a PPO ratio divides by: the trainer's where it recomputed them."""
        return self.trainer_logprobs if self.trainer_logprobs is not None else self.logprobs

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


def sample(sampler, cfg: dict, prompts: list[list[int]], picks: list[int], *, calls_for: int) -> list[Episode]:
    """num_generations completions of each picked prompt (groups stay together). `calls_for` is the
    number of prompts the busiest rank samples, so every rank makes the same generate calls."""
    g, rb = cfg["num_generations"], cfg["rollout_batch_size"]
    flat = [p for p in picks for _ in range(g)]
    outs = sampler.generate([prompts[p] for p in flat], max_new_tokens=cfg["max_new_tokens"], batch_size=rb,
                            temperature=cfg["temperature"], top_p=cfg["top_p"],
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
