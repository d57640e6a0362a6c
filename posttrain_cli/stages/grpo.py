"""Group relative policy optimisation (DeepSeekMath, R1) with the DAPO and Dr.GRPO options.

    stages:
      rlvr:
        kind: grpo
        data: [{path: allenai/RLVR-GSM-MATH-IF-Mixed-Constraints}]   # messages, ground_truth, dataset
        prompts_per_step: 64
        num_generations: 16        # the group
        beta: 0.01                 # KL to the reference; 0 loads none
        kl_estimator: k3
        adv_norm: group_std        # centered: Dr.GRPO / OLMo 3
        loss_agg: seq_mean_token_mean   # token_mean: DAPO, constant: Dr.GRPO
        clip_low: 0.2
        clip_high: 0.28            # DAPO clip-higher

Each step samples `num_generations` completions for each of `prompts_per_step`
prompts (split over ranks, a prompt's group on one rank), scores them with the
verifiers, turns rewards into advantages within each group, and takes
`mini_batches` optimizer updates on the batch with PPO's clipped ratio to the
sampling log-probs (recorded while generating, so no extra forward; when another engine samples,
the trainer's own, with truncated importance weights: rollout/onpolicy.py). Options
are registered functions (losses/rl.py): `adv_norm`, `loss_agg`, `kl_estimator`.
Dynamic sampling (DAPO) drops groups whose rewards are all equal and samples
more prompts, up to `dynamic_sampling_rounds` rounds; a batch still short then
keeps some of the dropped groups (their advantage is 0). Metrics per step:
reward mean / std, accuracy per verifier, KL, clip fraction, entropy, response
length, EOS rate.
"""

from __future__ import annotations

import time

import torch

from posttrain_cli.engine import deepspeed_engine as eng
from posttrain_cli.engine import dist
from posttrain_cli.engine.loop import total_steps
from posttrain_cli.losses import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from posttrain_cli.rollout import episodes as ep
from posttrain_cli.rollout.onpolicy import OnPolicy, Reference, behaviour, token_logps

# The ratio clipped to [1 - clip_low, 1 + clip_high] (losses/rl.py).
POLICY_LOSS = "clip_higher"


def overlong_penalty(length: int, max_len: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then falling linearly
    to -penalty at max_len."""
    start = max_len - buffer
    if length <= start:
        return 0.0
    return -penalty * min(1.0, (length - start) / buffer)


def advantages(episodes: list[ep.Episode], g: int, adv_norm: str) -> None:
    """Group advantages in place; a rank's episodes come as consecutive groups of g."""
    r = torch.tensor([e.reward for e in episodes], dtype=torch.float64).view(-1, g)
    a = ADVANTAGES[adv_norm](r).view(-1)
    for e, v in zip(episodes, a.tolist()):
        e.adv = v


def equal_group(group: list[ep.Episode]) -> bool:
    return max(e.reward for e in group) - min(e.reward for e in group) < 1e-9


def sample_scored(loop: OnPolicy, per_rank: int) -> list[ep.Episode]:
    """per_rank prompts' groups, sampled and rewarded (verifiers, overlong and no-EOS penalties)."""
    cfg = loop.cfg
    eps = loop.sample(per_rank)
    ep.score(eps, loop.rows, loop.rewards)
    if cfg["overlong_buffer"]:
        for e in eps:
            e.reward += overlong_penalty(len(e.ids), cfg["max_new_tokens"], cfg["overlong_buffer"],
                                         cfg["overlong_penalty"])
    ep.no_eos_penalty(eps, cfg)
    return eps


def rollout(loop: OnPolicy) -> tuple[list[ep.Episode], dict]:
    """This rank's share of a step's batch with group advantages, and the step's rollout metrics."""
    cfg, g, per_rank = loop.cfg, loop.cfg["num_generations"], loop.per_rank
    t0 = time.perf_counter()
    eps = sample_scored(loop, per_rank)
    sampled = list(eps)
    stats = {}
    if cfg["dynamic_sampling"]:
        groups = [eps[i:i + g] for i in range(0, len(eps), g)]
        kept = [grp for grp in groups if not equal_group(grp)]
        dropped = [grp for grp in groups if equal_group(grp)]
        rounds = 0
        while rounds < cfg["dynamic_sampling_rounds"]:
            need = per_rank - len(kept)
            most = int(dist.all_max(float(need)))
            if most == 0:
                break
            rounds += 1
            # Every rank draws `most` (lock-step); a rank needing fewer keeps only what it needs.
            more = sample_scored(loop, most)
            sampled += more
            for i in range(0, len(more), g):
                grp = more[i:i + g]
                (dropped if equal_group(grp) else kept).append(grp)
        kept = kept[:per_rank]
        kept += dropped[:per_rank - len(kept)]
        eps = [e for grp in kept for e in grp]
        n_kept, n_drawn = dist.all_sum([float(sum(not equal_group(grp) for grp in kept)), len(sampled) / g])
        stats = {"groups_with_signal": n_kept / max(dist.world() * per_rank, 1),
                 "prompts_sampled": n_drawn, "sampling_rounds": float(dist.all_max(float(rounds)))}
    advantages(eps, g, cfg["adv_norm"])
    metrics = ep.rollout_metrics(sampled if cfg["dynamic_sampling"] else eps, loop.names)
    metrics.update(stats, rollout_seconds=time.perf_counter() - t0)
    return eps, metrics


def run(ctx) -> dict:
    from posttrain_cli.engine.inference import load_tokenizer
    from posttrain_cli.rewards.dispatch import Rewards

    cfg = ctx.cfg
    tokenizer = load_tokenizer(ctx.input_model, ctx.run["model"])
    rewards = Rewards(cfg, warn=ctx.info)
    rows, prompts = ep.load_prompts(ctx, tokenizer, rewards)
    steps = total_steps(cfg, len(prompts), ctx.where(), "prompts", "prompts_per_step")
    k = cfg["mini_batches"]
    engine, pack = eng.train_policy(ctx, steps * k)
    agg, kl_fn = LOSS_AGGREGATIONS[cfg["loss_agg"]], KL_ESTIMATORS[cfg["kl_estimator"]]
    policy_loss = POLICY_LOSSES[POLICY_LOSS]
    # The loop keeps the reference: refreshed (below), resumed with the stage and freed before the save.
    loop = OnPolicy(ctx, engine, tokenizer, rows, prompts, rewards, pack, steps=steps, aggregation=agg,
                    ref=Reference(ctx, engine.module) if cfg["beta"] > 0 else None, recompute=True, fuse=True)
    if loop.ref is None:
        ctx.info("beta 0: no reference model, no KL term")

    def step_rollout(s: int) -> tuple[list[ep.Episode], dict]:
        if loop.ref is not None and cfg["ref_refresh_every"] and s and s % cfg["ref_refresh_every"] == 0:
            ctx.info(f"step {s}: the reference becomes the current policy")
            loop.ref.refresh(engine, tokenizer)
        return rollout(loop)

    def loss_fn(module, micro) -> tuple:
        """One micro-batch of an update: the clipped policy loss on the group advantages, plus
        beta x the KL estimate to the reference, aggregated by loss_agg."""
        lp, ent = token_logps(module, micro, cfg["temperature"], entropy=True)
        seq, n = micro["seq"], micro["n"]
        adv = torch.tensor([e.adv for e in micro["episodes"]], dtype=lp.dtype, device=lp.device)[seq]
        old, is_weight = behaviour(micro, cfg["is_cap"], lp if loop.fused else None)
        if loop.fused:
            loop.record_ratio(old, micro)
        pg, stats = policy_loss(lp, old, adv, cfg)
        if is_weight is not None:
            pg = pg * is_weight
        token_loss = pg
        kl = torch.zeros_like(lp)
        if loop.ref is not None:
            with torch.no_grad():
                ref_lp, _ = token_logps(loop.ref.module, micro, cfg["temperature"])
            kl = kl_fn(lp, ref_lp)
            token_loss = pg + cfg["beta"] * kl
        loss, _ = agg(token_loss, seq, n, cfg["max_new_tokens"])
        with torch.no_grad():
            extra = {name: float(agg(x.detach().to(lp.dtype), seq, n, cfg["max_new_tokens"])[0])
                     for name, x in (("kl", kl), ("clip_fraction", stats["clip_fraction"]), ("entropy", ent))}
        return loss, extra

    ctx.info(f"{steps} steps x {cfg['prompts_per_step']} prompts x {cfg['num_generations']} completions "
             f"({ctx.arith['prompts_per_rank']} prompts per rank), {k} update(s) per step, adv {cfg['adv_norm']}, "
             f"loss {cfg['loss_agg']}, clip [{1 - cfg['clip_low']:g}, {1 + cfg['clip_high']:g}], beta {cfg['beta']:g}, "
             f"ZeRO-{ctx.run['deepspeed']['zero_stage']}")
    out = loop.train(step_rollout, loss_fn)
    out.update(loop.reward_trend())
    return loop.finish(out)
