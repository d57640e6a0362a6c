"""PPO with a value model (InstructGPT, Tulu 3 RLVR): clipped policy and value losses, GAE,
a per-token KL penalty in the reward.

    stages:
      rlvr:
        kind: ppo
        from: dpo
        data: [{path: allenai/RLVR-GSM-MATH-IF-Mixed-Constraints}]
        value_from: rm             # a reward_model stage or path (Tulu 3: Tulu-3-8B-RM)
        reward_model: null         # an RM stage scoring completions, x rm_weight
        verifiable_reward: 10      # x the verifiers' score (Tulu 3)
        beta: 0.05                 # per-token KL penalty (kl_estimator k1)
        no_eos_penalty: -10
        ppo_epochs: 4
        gamma: 1.0
        lam: 0.95

Each step samples `num_generations` completions (default 1) for `prompts_per_step`
prompts and scores them: `rm_weight` x the reward model's score plus
`verifiable_reward` x the verifiers' weighted score; a completion cut at
max_new_tokens gets `no_eos_penalty` instead. One no-grad pass then records the
reference log-probs and the value model's predictions; the per-token reward is
-beta x KL(policy_old || ref) with the score added at the last token, and GAE
(gamma, lam) gives advantages (whitened over the rank's batch) and returns.
The policy and value model then train together for `ppo_epochs` passes of
`mini_batches` updates: PPO's clipped ratio (`cliprange`) plus `vf_coef` x the
clipped value loss (`cliprange_value`), token-mean over the mini-batch.

The value model is a one-label AutoModelForSequenceClassification read at every
completion position: by default the `reward_model` stage, else the input
policy with a new head. It must share the policy's tokenizer. Policy and value
train as one DeepSpeed engine (`value_lr` sets the value model's rate); only the
policy is saved.
"""

from __future__ import annotations

import torch

from posttrain_cli.engine import deepspeed_engine as eng
from posttrain_cli.engine import dist
from posttrain_cli.engine.inference import eval_mode
from posttrain_cli.engine.loop import total_steps
from posttrain_cli.errors import UserError
from posttrain_cli.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from posttrain_cli.losses.rl import clipped_value_loss, gae, whiten
from posttrain_cli.rollout import episodes as ep
from posttrain_cli.rollout.onpolicy import OnPolicy, Reference, behaviour, micro_batch, token_logps

# The ratio clipped to [1 - cliprange, 1 + cliprange] (losses/rl.py).
POLICY_LOSS = "clip"


class PolicyAndValue(torch.nn.Module):
    """One module for DeepSpeed: forward(which="policy" | "value", **inputs)."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, which: str, **inputs):
        return getattr(self, which)(**inputs)


def token_values(module, micro: dict) -> torch.Tensor:
    """The value head at every completion position of a packed micro-batch: V(state before token t)."""
    head = getattr(module, "module", module).value.score
    captured = {}
    handle = head.register_forward_hook(lambda _m, _i, out: captured.__setitem__("out", out))
    try:
        module(which="value", **micro["inputs"], use_cache=False)
    finally:
        handle.remove()
    return captured["out"][0, micro["positions"], 0].float()


class _Policy:
    """Calls a PolicyAndValue engine as the policy, so rollout helpers can treat it as a causal LM."""

    def __init__(self, engine):
        self.engine = engine
        self.causal_lm = engine.module.policy  # whose head engine/lm_head.target_logps asks

    def __call__(self, **inputs):
        return self.engine(which="policy", **inputs)


def prepare(episodes: list[ep.Episode], engine, ref, cfg: dict, mb: dict, micro_size: int) -> dict:
    """No-grad pass over the rollout: reference log-probs, old values; then per-token rewards,
    GAE advantages and returns, each a list of per-token tensors (one per episode)."""
    kl_fn = KL_ESTIMATORS[cfg["kl_estimator"]]
    n = len(episodes)
    old_values: list = [None] * n
    ref_lp: list = [None] * n
    with torch.no_grad(), eval_mode(engine):
        for chunk in forward_chunks_local(n, micro_size):
            micro = micro_batch([episodes[i] for i in chunk], LOSS_AGGREGATIONS["token_mean"], 1, **mb)
            vals = token_values(engine, micro).cpu()
            r = token_logps(ref.module, micro, cfg["temperature"])[0].cpu() if ref is not None else None
            seq = micro["seq"].cpu()
            for j, i in enumerate(chunk):
                old_values[i] = vals[seq == j]
                if r is not None:
                    ref_lp[i] = r[seq == j]
    rewards, kls = [], []
    for i, e in enumerate(episodes):
        old = torch.tensor(e.old_logprobs, dtype=torch.float32)
        kl = kl_fn(old, ref_lp[i]) if ref_lp[i] is not None else torch.zeros_like(old)
        r = -cfg["beta"] * kl
        r[-1] += e.reward
        rewards.append(r)
        kls.append(kl)
    if cfg["whiten_rewards"]:
        flat = whiten(torch.cat(rewards), shift_mean=False)
        rewards = list(torch.split(flat, [len(r) for r in rewards]))
    advs, rets = zip(*(gae(r, v, cfg["gamma"], cfg["lam"]) for r, v in zip(rewards, old_values)))
    advs = list(advs)
    if cfg["whiten_advantages"]:
        flat = whiten(torch.cat(advs))
        advs = list(torch.split(flat, [len(a) for a in advs]))
    return {"values": old_values, "adv": advs, "returns": list(rets), "kl": kls,
            "non_score_reward": [float(-cfg["beta"] * k.sum()) for k in kls]}


def forward_chunks_local(n: int, size: int) -> list[list[int]]:
    """This rank's own episodes in chunks (every rank holds the same number, so calls match)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def policy_and_value(ctx, tokenizer, total_updates: int):
    """The policy and the value model (value_from, else the reward model, else the policy with a
    new head) as one DeepSpeed engine, dropout off, the value half at value_lr -> (engine, pack options)."""
    from posttrain_cli.engine.inference import load_tokenizer, pad_id

    cfg, model_cfg = ctx.cfg, ctx.run["model"]
    ds_cfg = eng.train_ds_config(ctx)
    value_path = ctx.models.get("value_from") or ctx.models.get("reward_model") or ctx.input_model
    if load_tokenizer(value_path, model_cfg).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{ctx.where('value_from')}: the value model {value_path} has a different tokenizer from "
                        f"the policy {ctx.input_model}; PPO reads values at the policy's tokens")
    ctx.info(f"value model from {value_path}" + (" (a new scalar head)" if value_path == ctx.input_model else ""))
    policy = eng.load_causal_lm(ctx.input_model, model_cfg, ds_cfg, train=True, quantize=eng.quantize_of(ctx))
    value = eng.load_scorer(value_path, model_cfg, ds_cfg, train=True, pad_token_id=pad_id(tokenizer),
                            quantize=eng.quantize_of(ctx))
    for m in (policy, value):
        eng.disable_dropout(m)
    policy = eng.trainable(ctx, policy, what=" (policy)")
    value = eng.trainable(ctx, value, score_head=True, what=" (value model)")
    value_lr = cfg["value_lr"] if cfg["value_lr"] is not None else cfg["lr"]
    engine = eng.initialize(PolicyAndValue(policy, value), ds_cfg, cfg, total_updates,
                            lr_for=lambda name: value_lr if name.startswith("value.") else cfg["lr"])
    return engine, eng.pack_options(ctx.run, engine.device)


def run(ctx) -> dict:
    from posttrain_cli.engine.inference import load_tokenizer
    from posttrain_cli.kinds import KINDS
    from posttrain_cli.rewards.dispatch import Rewards
    from posttrain_cli.rewards.rm import RewardScorer

    cfg = ctx.cfg
    model_cfg = ctx.run["model"]
    tokenizer = load_tokenizer(ctx.input_model, model_cfg)
    rewards = Rewards(cfg, warn=ctx.info) if KINDS[ctx.kind].uses_verifiers(cfg) else None
    rows, prompts = ep.load_prompts(ctx, tokenizer, rewards)
    steps = total_steps(cfg, len(prompts), ctx.where(), "prompts", "prompts_per_step")
    k, epochs = cfg["mini_batches"], cfg["ppo_epochs"]
    engine, mb = policy_and_value(ctx, tokenizer, steps * k * epochs)
    rm_path = ctx.models.get("reward_model")
    ref = Reference(ctx, engine.module.policy) if cfg["beta"] > 0 else None
    scorer = (RewardScorer(rm_path, model_cfg, ctx.run["deepspeed"], batch_size=cfg["rollout_batch_size"])
              if rm_path and cfg["rm_weight"] else None)
    agg, policy_loss = LOSS_AGGREGATIONS["token_mean"], POLICY_LOSSES[POLICY_LOSS]
    loop = OnPolicy(ctx, engine, tokenizer, rows, prompts, rewards, mb, steps=steps, aggregation=agg,
                    passes=epochs, policy=engine.module.policy, ref=ref, recompute=True)
    prep: dict = {}  # this step's values, advantages and returns per episode (prepare)

    def rollout(_s: int) -> tuple[list[ep.Episode], dict]:
        """Sample and score, then the no-grad pass: values, the KL-penalised rewards and GAE."""
        eps = loop.sample()
        if rewards is not None:
            ep.score(eps, rows, rewards, weight=cfg["verifiable_reward"])
        if scorer is not None:
            rm = scorer.score([rows[e.prompt]["messages"] for e in eps], [e.text for e in eps],
                              calls=-(-len(eps) // cfg["rollout_batch_size"]))
            for e, r in zip(eps, rm):
                e.reward += cfg["rm_weight"] * r
        ep.no_eos_penalty(eps, cfg)
        for i, e in enumerate(eps):
            e.index = i
        prep.update(prepare(eps, engine, ref, cfg, mb, ctx.arith["micro_batch_size"]))
        metrics = ep.rollout_metrics(eps, loop.names)
        nsr, kl, toks = dist.all_sum([sum(prep["non_score_reward"]), float(sum(x.sum() for x in prep["kl"])),
                                      float(sum(len(e.ids) for e in eps))])
        metrics.update(non_score_reward=nsr / (len(eps) * dist.world()), rollout_kl=kl / max(toks, 1.0))
        return eps, metrics

    def loss_fn(module, micro) -> tuple:
        """One micro-batch of an update: the clipped policy loss on the GAE advantages plus vf_coef x
        the clipped value loss, token mean."""
        idx = [e.index for e in micro["episodes"]]
        adv = torch.cat([prep["adv"][i] for i in idx]).to(engine.device)
        ret = torch.cat([prep["returns"][i] for i in idx]).to(engine.device)
        old_v = torch.cat([prep["values"][i] for i in idx]).to(engine.device)
        lp, ent = token_logps(_Policy(module), micro, cfg["temperature"], entropy=True)
        old, is_weight = behaviour(micro, cfg["is_cap"])
        pg, stats = policy_loss(lp, old, adv, cfg)
        if is_weight is not None:
            pg = pg * is_weight
        v = token_values(module, micro)
        vf, v_clipped = clipped_value_loss(v, old_v, ret, cfg["cliprange_value"])
        seq, n = micro["seq"], micro["n"]
        loss, _ = agg(pg + cfg["vf_coef"] * vf, seq, n, cfg["max_new_tokens"])
        with torch.no_grad():
            extra = {name: float(agg(x.detach().to(lp.dtype), seq, n, cfg["max_new_tokens"])[0])
                     for name, x in (("policy_loss", pg), ("value_loss", vf), ("clip_fraction", stats["clip_fraction"]),
                                     ("value_clip_fraction", v_clipped), ("entropy", ent),
                                     ("approx_kl", 0.5 * (lp - old) ** 2))}
        return loss, extra

    ctx.info(f"{steps} steps x {cfg['prompts_per_step']} prompts x {cfg['num_generations']} completion(s), "
             f"{epochs} PPO epoch(s) x {k} mini-batch(es), beta {cfg['beta']:g} ({cfg['kl_estimator']}), "
             f"reward: " + " + ".join(([f"{cfg['rm_weight']:g} x RM"] if scorer else [])
                                      + ([f"{cfg['verifiable_reward']:g} x verifiers"] if rewards else []))
             + f", ZeRO-{ctx.run['deepspeed']['zero_stage']}")
    out = loop.train(rollout, loss_fn)
    out.update(loop.reward_trend())
    ref = scorer = None
    return loop.finish(out, part="policy")
