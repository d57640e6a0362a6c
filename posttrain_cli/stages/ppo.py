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
from posttrain_cli.engine.loop import total_steps, train
from posttrain_cli.errors import UserError
from posttrain_cli.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS
from posttrain_cli.losses.rl import clipped_policy_loss, clipped_value_loss, gae, whiten
from posttrain_cli.rollout import episodes as ep


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

    def __call__(self, **inputs):
        return self.engine(which="policy", **inputs)


def prepare(episodes: list[ep.Episode], engine, ref, cfg: dict, mb: dict, micro_size: int) -> dict:
    """No-grad pass over the rollout: reference log-probs, old values; then per-token rewards,
    GAE advantages and returns, each a list of per-token tensors (one per episode)."""
    kl_fn = KL_ESTIMATORS[cfg["kl_estimator"]]
    n = len(episodes)
    old_values: list = [None] * n
    ref_lp: list = [None] * n
    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        for chunk in forward_chunks_local(n, micro_size):
            micro = ep.micro_batch([episodes[i] for i in chunk], LOSS_AGGREGATIONS["token_mean"], 1, **mb)
            vals = token_values(engine, micro).cpu()
            r = ep.token_logps(ref.module, micro, cfg["temperature"])[0].cpu() if ref is not None else None
            seq = micro["seq"].cpu()
            for j, i in enumerate(chunk):
                old_values[i] = vals[seq == j]
                if r is not None:
                    ref_lp[i] = r[seq == j]
    if was_training:
        engine.train()
    rewards, kls = [], []
    for i, e in enumerate(episodes):
        old = torch.tensor(e.logprobs, dtype=torch.float32)
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


def run(ctx) -> dict:
    from transformers import AutoTokenizer

    from posttrain_cli.rewards.dispatch import Rewards, uses_verifiers
    from posttrain_cli.rewards.rm import RewardScorer

    cfg = ctx.cfg
    model_cfg = ctx.run["model"]
    tokenizer = AutoTokenizer.from_pretrained(ctx.input_model, trust_remote_code=model_cfg["trust_remote_code"])
    rewards = Rewards(cfg, warn=ctx.info) if uses_verifiers(cfg) else None
    rows, prompts = ep.load_prompts(ctx, tokenizer, rewards)
    names = rewards.names(rows) if rewards else []
    steps = total_steps(cfg, len(prompts), ctx.where(), "prompts", "prompts_per_step")
    k, epochs = cfg["mini_batches"], cfg["ppo_epochs"]
    per_step = k * epochs
    batch = ctx.arith
    ds_cfg = eng.train_ds_config(ctx)
    infer_ds = eng.ds_config(ctx.run["deepspeed"], micro_batch_size=1, grad_accum=1, grad_clip=None)

    rm_path = ctx.models.get("reward_model")
    value_path = ctx.models.get("value_from") or rm_path or ctx.input_model
    value_tok = AutoTokenizer.from_pretrained(value_path, trust_remote_code=model_cfg["trust_remote_code"])
    if value_tok.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{ctx.where('value_from')}: the value model {value_path} has a different tokenizer from "
                        f"the policy {ctx.input_model}; PPO reads values at the policy's tokens")
    ctx.info(f"value model from {value_path}" + (" (a new scalar head)" if value_path == ctx.input_model else ""))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = eng.load_causal_lm(ctx.input_model, model_cfg, ds_cfg, train=True)
    value = eng.load_scorer(value_path, model_cfg, ds_cfg, train=True, pad_token_id=pad)
    for m in (policy, value):
        eng.disable_dropout(m)
    value_lr = cfg["value_lr"] if cfg["value_lr"] is not None else cfg["lr"]
    engine = eng.initialize(PolicyAndValue(policy, value), ds_cfg, cfg, steps * per_step,
                            lr_for=lambda name: value_lr if name.startswith("value.") else cfg["lr"])
    mb = eng.pack_options(ctx.run, engine.device)
    ref = ep.Reference(ctx, model_cfg) if cfg["beta"] > 0 else None
    scorer = (RewardScorer(rm_path, model_cfg, infer_ds, batch_size=cfg["rollout_batch_size"])
              if rm_path and cfg["rm_weight"] else None)
    synced = ctx.run["deepspeed"]["zero_stage"] == 3 and dist.world() > 1
    stream = ep.PromptStream(len(prompts), ctx.seed)
    per_rank = batch["prompts_per_rank"]
    agg = LOSS_AGGREGATIONS["token_mean"]
    state: dict = {"updates": [], "metrics": {}, "prep": {}}
    history: list[dict] = []

    def rollout(s: int) -> None:
        eps = ep.sample(engine.module.policy, tokenizer, cfg, prompts, stream.draw(per_rank), synced=synced,
                        calls_for=per_rank)
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
        prep = prepare(eps, engine, ref, cfg, mb, batch["micro_batch_size"])
        state["prep"] = prep
        metrics = ep.rollout_metrics(eps, names)
        nsr, kl, toks = dist.all_sum([sum(prep["non_score_reward"]), float(sum(x.sum() for x in prep["kl"])),
                                      float(sum(len(e.ids) for e in eps))])
        metrics.update(non_score_reward=nsr / (len(eps) * dist.world()), rollout_kl=kl / max(toks, 1.0))
        state["metrics"] = metrics
        history.append(metrics)
        updates = []
        for epoch in range(epochs):
            updates += ep.split_updates(eps, k, batch["micro_batch_size"],
                                        ctx.seed * 7919 + s * 31 + epoch * 7 + dist.rank())
        state["updates"] = updates

    def micro_batches(update: int) -> list[dict]:
        s, j = divmod(update, per_step)
        if j == 0:
            rollout(s)
        return [ep.micro_batch(m, agg, cfg["max_new_tokens"], **mb) for m in state["updates"][j]]

    def loss_fn(module, micro) -> tuple:
        prep = state["prep"]
        idx = [e.index for e in micro["episodes"]]
        adv = torch.cat([prep["adv"][i] for i in idx]).to(engine.device)
        ret = torch.cat([prep["returns"][i] for i in idx]).to(engine.device)
        old_v = torch.cat([prep["values"][i] for i in idx]).to(engine.device)
        lp, ent = ep.token_logps(_Policy(module), micro, cfg["temperature"], entropy=True)
        pg, clipped = clipped_policy_loss(lp, micro["old_logps"], adv, cfg["cliprange"], cfg["cliprange"])
        v = token_values(module, micro)
        vf, v_clipped = clipped_value_loss(v, old_v, ret, cfg["cliprange_value"])
        seq, n = micro["seq"], micro["n"]
        loss, _ = agg(pg + cfg["vf_coef"] * vf, seq, n, cfg["max_new_tokens"])
        with torch.no_grad():
            extra = {name: float(agg(x.detach().to(lp.dtype), seq, n, cfg["max_new_tokens"])[0])
                     for name, x in (("policy_loss", pg), ("value_loss", vf), ("clip_fraction", clipped),
                                     ("value_clip_fraction", v_clipped), ("entropy", ent),
                                     ("approx_kl", 0.5 * (lp - micro["old_logps"]) ** 2))}
        return loss, extra

    ctx.info(f"{steps} steps x {cfg['prompts_per_step']} prompts x {cfg['num_generations']} completion(s), "
             f"{epochs} PPO epoch(s) x {k} mini-batch(es), beta {cfg['beta']:g} ({cfg['kl_estimator']}), "
             f"reward: " + " + ".join(([f"{cfg['rm_weight']:g} x RM"] if scorer else [])
                                      + ([f"{cfg['verifiable_reward']:g} x verifiers"] if rewards else []))
             + f", ZeRO-{ctx.run['deepspeed']['zero_stage']}")
    metrics = train(ctx, engine, total_steps=steps * per_step, micro_batches=micro_batches, loss_fn=loss_fn,
                    step_metrics=lambda _: state["metrics"], unit=per_step,
                    state=ep.rl_state(stream, history, rewards))
    trend = ep.reward_trend(ctx, history)
    ref = scorer = None
    eng.save_hf(engine, tokenizer, ctx.work_dir / "model", part="policy")
    engine = policy = value = None
    out = {**metrics, "rl_steps": steps, **trend}
    if rewards is not None and rewards.failures:
        out["verifier_failures"] = dict(rewards.failures)
    return {"metrics": out, "outputs": {"model": "model"}}
