"""Rejection sampling: K completions per prompt, scored; the best (Llama 2 / 3) or every one that
passes (R1) becomes an SFT row.

    stages:
      rs:
        kind: rejection_sampling
        from: sft                    # the policy to sample (default: the previous policy stage)
        data: [{path: prompts.jsonl}]
        num_samples: 8               # K
        keep: best                   # best-of-K (Llama 2 / 3); all_pass: every passing one (R1)
        reward_model: rm             # and/or verifier / verifiers (rows with ground_truth)
        threshold: 0.5               # optional minimum score
      sft2:
        kind: sft
        data: [{from: rs}]

score = rm_weight x reward model + verifiable_reward x (weighted verifier scores, rewards/dispatch.py).
keep: best keeps each prompt's highest-scoring sample (the first of equals) when it reaches
`threshold` (if set). keep: all_pass keeps every sample that passes: score >= threshold, or
without a threshold (verifiers alone) full marks (>= 1) from every verifier of its row; distinct
completions only, at most `max_per_prompt` of them (the highest scores). With `drop_truncated`
a sample cut at max_new_tokens is never kept. Rows are those of `generate` plus `score`,
`scores` (raw, per verifier), `rm_score` and `sample_scores` (the prompt's K scores, in sample
order). Departures: Llama 2 samples from the best earlier checkpoints too; here one model, K
samples (list several stages in `data` of a later sft to pool them). Metrics: acceptance_rate
(prompts with a kept row / prompts), mean_best_score (mean over prompts of the max of its K
scores), mean_score (over all samples), rows, accuracy per verifier, verifier_failures. Keeping
nothing is an error, never an empty dataset.
"""

from __future__ import annotations

import gc
import math
import time

from posttrain_cli.engine import dist
from posttrain_cli.engine.inference import load_tokenizer
from posttrain_cli.errors import UserError
from posttrain_cli.rollout import sampling
from posttrain_cli.rollout.sampling import Sample


def passes(s: Sample, threshold: float | None) -> bool:
    """all_pass: score >= threshold, or without one full marks from every verifier of the row."""
    if threshold is not None:
        return s.score >= threshold
    return bool(s.scores) and all(v >= 1 for v in s.scores.values())


def keep_best(cands: list[Sample], threshold: float | None, most: int | None) -> list[Sample]:
    if not cands:
        return []
    top = max(cands, key=lambda s: s.score)  # max() returns the first of equals
    return [top] if threshold is None or top.score >= threshold else []


def keep_all_pass(cands: list[Sample], threshold: float | None, most: int | None) -> list[Sample]:
    ranked = sorted((s for s in cands if passes(s, threshold)), key=lambda s: -s.score)  # stable
    seen, distinct = set(), []
    for s in ranked:
        if s.text not in seen:
            seen.add(s.text)
            distinct.append(s)
    return sorted(distinct[:most] if most else distinct, key=lambda s: s.index)


KEEP = {"best": keep_best, "all_pass": keep_all_pass}


def select(samples: list[Sample], *, keep: str, threshold: float | None = None, max_per_prompt: int | None = None,
           drop_truncated: bool = False) -> list[Sample]:
    """The kept samples of each prompt (grouped by Sample.prompt), prompts in order of appearance."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.prompt, []).append(s)
    out = []
    for group in groups.values():
        cands = [s for s in group if not (drop_truncated and s.truncated)]
        out += KEEP[keep](cands, threshold, max_per_prompt)
    return out


def score(ctx, prompts: sampling.Prompts, samples: list[Sample], rewards, calls: int) -> None:
    """Each sample's score in place; `calls`: reward-model forwards, equal on every rank (ZeRO-3)."""
    cfg = ctx.cfg
    rm_path = ctx.models.get("reward_model")
    if rm_path:
        from posttrain_cli.rewards.rm import RewardScorer

        scorer = RewardScorer(rm_path, ctx.run["model"], ctx.run["deepspeed"], batch_size=cfg["batch_size"])
        got = scorer.score([prompts.rows[s.prompt]["messages"] for s in samples], [s.text for s in samples],
                           calls=calls)
        del scorer
        for s, r in zip(samples, got):
            s.rm_score = r
            s.score += cfg["rm_weight"] * r
    if rewards is not None and samples:
        total, parts = rewards.score([s.text for s in samples], [prompts.rows[s.prompt] for s in samples])
        for s, t, p in zip(samples, total, parts):
            s.scores = dict(p)
            s.score += cfg["verifiable_reward"] * t


def _nothing_kept(ctx, n_prompts: int, best: float, truncated: int) -> UserError:
    """`best`: the highest score of a sample that could be kept (-inf when every one was cut)."""
    cfg, w = ctx.cfg, ctx.where
    cut = f" ({truncated} cut at max_new_tokens were dropped)" if truncated else ""
    if best == -math.inf:
        why = "every sample was cut at max_new_tokens without EOS"
        fix = f"raise {w('max_new_tokens')}, set {w('drop_truncated')}=false"
    elif cfg["threshold"] is not None:
        why = f"the best score, {best:.4g}, is below threshold {cfg['threshold']:g}{cut}"
        fix = f"lower {w('threshold')}"
    else:
        why = f"none got full marks (>= 1) from every verifier of its row{cut}"
        fix = f"set {w('threshold')}"
    return UserError(f"{w()}: kept no completion of {n_prompts} prompts x {cfg['num_samples']} samples: {why}; "
                     f"{fix} or raise {w('num_samples')}")


def run(ctx) -> dict:
    from posttrain_cli.kinds import KINDS
    from posttrain_cli.rewards.dispatch import Rewards

    cfg = ctx.cfg
    k = cfg["num_samples"]
    start = time.perf_counter()
    tokenizer = load_tokenizer(ctx.input_model, ctx.run["model"])
    rewards = (Rewards(cfg, warn=ctx.info, where=ctx.where(), suggest_reward_model=True)
               if KINDS[ctx.kind].uses_verifiers(cfg) else None)
    prompts = sampling.load(ctx, tokenizer)
    names = []
    if rewards is not None:
        rewards.check_rows(prompts.rows)  # rows from an earlier stage's dataset are checked only here
        names = rewards.names(prompts.rows)
    sampler = sampling.input_sampler(ctx, tokenizer)
    samples = sampling.sample(ctx, sampler, prompts, k)
    del sampler
    gc.collect()
    _, most = sampling.mine(len(prompts.rows))
    score(ctx, prompts, samples, rewards, calls=math.ceil(most * k / cfg["batch_size"]))
    kept = select(samples, keep=cfg["keep"], threshold=cfg["threshold"], max_per_prompt=cfg["max_per_prompt"],
                  drop_truncated=cfg["drop_truncated"])

    groups: dict[int, list[float]] = {}
    for s in samples:
        groups.setdefault(s.prompt, []).append(s.score)
    sums = sampling.generation_sums(samples) + [
        len(groups), len({s.prompt for s in kept}), len(kept), sum(max(g) for g in groups.values()),
        sum(s.score for s in samples), sum(s.truncated for s in samples) if cfg["drop_truncated"] else 0]
    for name in names:
        got = [s.scores[name] for s in samples if name in s.scores]
        sums += [sum(got), len(got), rewards.failures[name]]
    tot = dist.all_sum(sums)
    n, eos, tokens, n_prompts, accepted, rows, best_sum, score_sum, truncated = tot[:9]
    if not rows:
        best = dist.all_max(max((s.score for s in samples if not (cfg["drop_truncated"] and s.truncated)),
                                default=-math.inf))
        raise _nothing_kept(ctx, int(n_prompts), best, int(truncated))

    out_rows = []
    for s in kept:
        extra = {"score": s.score}
        if rewards is not None:
            extra["scores"] = s.scores
        if s.rm_score is not None:
            extra["rm_score"] = s.rm_score
        extra["sample_scores"] = groups[s.prompt]
        out_rows.append(sampling.output_row(prompts.rows[s.prompt], s, prompts.index[s.prompt], **extra))
    sampling.write_rows(ctx, out_rows)

    metrics = {"prompts": int(n_prompts), "prompts_too_long": prompts.too_long, "samples": int(n),
               "rows": int(rows), "acceptance_rate": accepted / n_prompts, "mean_best_score": best_sum / n_prompts,
               "mean_score": score_sum / n, "truncated_dropped": int(truncated), "eos_rate": eos / n,
               "mean_length": tokens / n}
    failures = {}
    for i, name in enumerate(names):
        s_sum, count, failed = tot[9 + 3 * i: 12 + 3 * i]
        metrics[f"accuracy/{name}"] = s_sum / count if count else 0.0
        if failed:
            failures[name] = int(failed)
    if failures:
        metrics["verifier_failures"] = failures
    metrics["seconds"] = time.perf_counter() - start
    ctx.info(f"kept {metrics['rows']} rows: {metrics['acceptance_rate']:.1%} of {metrics['prompts']} prompts "
             f"accepted ({cfg['keep']}, K={k}); mean best score {metrics['mean_best_score']:.4g}, mean score "
             f"{metrics['mean_score']:.4g}" + (f"; {metrics['truncated_dropped']} samples cut at max_new_tokens "
                                               f"dropped" if metrics["truncated_dropped"] else ""))
    return {"metrics": metrics, "outputs": {"data": "data.jsonl"}}
