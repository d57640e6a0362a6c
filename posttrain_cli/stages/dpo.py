"""Direct preference optimisation and its family: dpo, dpo_norm, ipo, simpo, hinge.

    stages:
      dpo:
        kind: dpo
        data: [{path: allenai/llama-3.1-tulu-3-8b-preference-mixture}]
        loss: dpo_norm            # a name in posttrain_cli.losses.PREFERENCE_LOSSES
        beta: 5
        nll_weight: 0.0           # Llama 3: 0.2
        ref_from: null            # default: the stage's input model

- Chosen and rejected answers of a micro-batch go through one forward as one
  packed row; log-probs are computed only at answer tokens.
- Reference log-probs are computed once before training, over the training
  and held-out pairs, and cached in the stage folder, so training holds one
  model. When the reference is the input model (the default) the policy
  itself computes them before its first step; `ref_from` loads another model
  for that pass and frees it. `precompute_ref: false` keeps a live reference
  next to the policy instead (sharded like it under ZeRO-3). `simpo` needs no
  reference and loads none.
- `global_batch_size` and `micro_batch_size` count pairs. A row ranking K
  answers becomes its K(K-1)/2 pairs.
- Metrics per step and on `heldout` before and after training: `accuracy`
  (share of pairs whose implicit reward prefers chosen, a tie counting half:
  50% before training, when the policy is its own reference), `reward_margin`,
  chosen / rejected rewards and log-probs, `nll` (chosen, per token), and
  `logp_accuracy`: the share of pairs the policy itself ranks chosen first by
  log-likelihood (per token for dpo_norm and simpo), which needs no reference.
- Departures: dropout is off while training (TRL, open-instruct do the same).
"""

from __future__ import annotations

import time

import torch

from posttrain_cli.data import preference as pref
from posttrain_cli.engine import deepspeed_engine as eng
from posttrain_cli.engine import dist, lora
from posttrain_cli.engine.inference import eval_mode, frozen_causal_lm, load_tokenizer
from posttrain_cli.engine.lm_head import target_logps
from posttrain_cli.engine.loop import StepPlan, forward_chunks, total_steps, train
from posttrain_cli.losses.preference import (PairLogps, PrefOptions, length_normalized, preference_loss,
                                             sequence_logps, uses_reference)


def micro_batch(pairs: list[dict], idx: list[int], *, boundaries: str, mask_dtype, device) -> dict:
    """Pairs idx -> one packed row [chosen_1..chosen_m, rejected_1..rejected_m]."""
    seqs = [pairs[i]["answers"][0] for i in idx] + [pairs[i]["answers"][1] for i in idx]
    micro = pref.pack_answers(seqs, boundaries, mask_dtype, device)
    micro.update(idx=idx, weight=float(len(idx)))
    return micro


def answer_logps(module, micro: dict) -> torch.Tensor:
    """[2m] summed log-probs of each packed answer (chosen first, then rejected)."""
    logps, _ = target_logps(module, micro["inputs"], micro["targets"], micro["positions"])
    return sequence_logps(logps, micro["seq"], micro["n"])


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.shape[0] // 2
    return x[:m], x[m:]


class DPOStep:
    """The per-pair math shared by training and held-out evaluation."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.opts = PrefOptions(beta=cfg["beta"], label_smoothing=cfg["label_smoothing"],
                                simpo_gamma=cfg["simpo_gamma"])
        self.norm = length_normalized(cfg["loss"])

    def terms(self, logps: torch.Tensor, ref: torch.Tensor | None, tokens: torch.Tensor) -> tuple:
        """logps [2m] policy, ref [m, 2] or None, tokens [2m] -> (loss sum, metric sums)."""
        c, r = split(logps)
        tc, tr = split(tokens)
        p = PairLogps(c, r, tc, tr, *((ref[:, 0], ref[:, 1]) if ref is not None else (None, None)))
        loss, rc, rr, nll = preference_loss(self.cfg["loss"], p, self.opts, self.cfg["nll_weight"])
        sc, sr = (c / tc, r / tr) if self.norm else (c, r)
        with torch.no_grad():
            d = (rc - rr).detach()
            s = (sc - sr).detach()
            extra = {
                "accuracy": float(((d > 0).float() + 0.5 * (d == 0).float()).sum()),
                "reward_margin": float(d.sum()),
                "chosen_reward": float(rc.detach().sum()),
                "rejected_reward": float(rr.detach().sum()),
                "chosen_logps": float(c.detach().sum()),
                "rejected_logps": float(r.detach().sum()),
                "nll": float(nll.detach().sum()),
                "logp_accuracy": float(((s > 0).float() + 0.5 * (s == 0).float()).sum()),
            }
        return loss.sum(), extra


@torch.no_grad()
def logps_pass(module, pairs: list[dict], micro_size: int, only: list[int] | None = None, progress=None,
               **mb) -> torch.Tensor:
    """[N, 2] (chosen, rejected) summed log-probs of every pair (or of the pairs `only` lists; the
    others are NaN), split over ranks, gathered on all. progress(total) -> a bar (ctx.progress)."""
    idx = list(range(len(pairs))) if only is None else only
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    chunks = forward_chunks(len(idx), micro_size)
    bar = progress(len(chunks)) if progress else None
    with eval_mode(module):
        for done, chunk in enumerate(chunks, 1):
            rows = [idx[i] for i in chunk] if chunk is not None else None
            micro = micro_batch(pairs, rows or [idx[0]], **mb)
            c, r = split(answer_logps(module, micro).double().cpu())
            if rows is not None:
                out[rows, 0], out[rows, 1] = c, r
            if bar:
                bar.update(done, {})
    if bar:
        bar.close()
    out = dist.all_sum_tensor(out)
    if only is not None and len(only) < len(pairs):
        skipped = torch.ones(len(pairs), dtype=torch.bool)
        skipped[only] = False
        out[skipped] = float("nan")
    return out


def heldout_metrics(step: DPOStep, pairs: list[dict], logps: torch.Tensor, ref: torch.Tensor | None) -> dict:
    """Metrics of held-out pairs from their log-probs [N, 2] (no forward here)."""
    tokens = torch.tensor([[sum(p["answers"][k][1]) for k in (0, 1)] for p in pairs], dtype=torch.float64)
    flat = torch.cat([logps[:, 0], logps[:, 1]])
    loss, extra = step.terms(flat, ref, torch.cat([tokens[:, 0], tokens[:, 1]]))
    n = len(pairs)
    return {"loss": float(loss) / n, **{k: v / n for k, v in extra.items()}, "pairs": n}


def _reference_logps(ctx, engine, model_cfg: dict, pairs: list[dict], held: list[dict], mb: dict,
                     micro_size: int, visited: list[int]) -> dict:
    """Reference log-probs of the training pairs the steps visit (all of them unless max_steps stops
    short of an epoch) and of every held-out pair, computed once (all ranks) and cached on disk."""

    def build() -> dict:
        ref_path = ctx.models.get("ref_from")
        if ref_path is None or ref_path == ctx.input_model:
            ctx.info("reference log-probs: computed by the policy before its first step (reference = input model)")
            module = engine
        else:
            ctx.info(f"reference log-probs: computed once with {ref_path}, then freed")
            module = frozen_causal_lm(ref_path, model_cfg, ctx.run["deepspeed"])
        bar = lambda total: ctx.progress(total, "reference log-probs")  # noqa: E731
        return {"train": logps_pass(module, pairs, micro_size, only=visited, progress=bar, **mb),
                "heldout": logps_pass(module, held, micro_size, **mb) if held else None}

    return ctx.cached("ref", build, collective=True)


def run(ctx) -> dict:
    cfg = ctx.cfg
    model_cfg = ctx.run["model"]
    tokenizer = load_tokenizer(ctx.input_model, model_cfg)
    data = pref.prepare(ctx, tokenizer)
    pairs, held = pref.as_pairs(data["train"]), pref.as_pairs(data["heldout"])

    steps = total_steps(cfg, len(pairs), ctx.where(), "preference pairs")
    batch = ctx.arith
    engine, mb = eng.train_policy(ctx, steps)
    micro_size = batch["micro_batch_size"]
    step_math = DPOStep(cfg)

    plan = StepPlan(len(pairs), batch, ctx.seed)
    ref_logps, live_ref = None, None
    t_ref = time.perf_counter()
    if uses_reference(cfg["loss"]):
        if cfg["precompute_ref"]:
            visited = sorted({i for s in range(steps) for i in plan.step(s)})
            ref_logps = _reference_logps(ctx, engine, model_cfg, pairs, held, mb, micro_size, visited)
        else:
            ref_path = ctx.models.get("ref_from") or ctx.input_model
            live_ref = lora.input_network(engine) if ref_path == ctx.input_model else None
            if live_ref is not None:
                ctx.info("reference: the policy with its LoRA adapter off (precompute_ref: false; no second model)")
            else:
                ctx.info(f"reference: a live copy of {ref_path} next to the policy (precompute_ref: false)")
                live_ref = frozen_causal_lm(ref_path, model_cfg, ctx.run["deepspeed"])
    else:
        ctx.info(f"loss {cfg['loss']} is reference-free: no reference model")
    ref_seconds = time.perf_counter() - t_ref

    # The held-out pairs' reference log-probs, once (a live reference computes them here).
    ref_h = None
    if held and ref_logps is not None:
        ref_h = ref_logps["heldout"]
    elif held and live_ref is not None:
        ref_h = logps_pass(live_ref, held, micro_size, **mb)

    heldout = {}
    if held:
        # The untrained policy is the reference when ref_from is unset: its log-probs are already known.
        same = ref_logps is not None and ctx.models.get("ref_from") in (None, ctx.input_model)
        before = ref_h if same else logps_pass(engine, held, micro_size, **mb)
        heldout["before"] = heldout_metrics(step_math, held, before, ref_h)
        b = heldout["before"]
        ctx.info(f"held-out before ({len(held)} pairs): implicit reward accuracy {b['accuracy']:.1%}; "
                 f"the policy's likelihood prefers chosen on {b['logp_accuracy']:.1%}")

    def micro_batches(step: int) -> list[dict]:
        return [micro_batch(pairs, idx, **mb) for idx in plan.micro_indices(step, dist.rank(), dist.world())]

    def loss_fn(module, micro) -> tuple:
        if ref_logps is not None:
            ref = ref_logps["train"][micro["idx"]].to(micro["answer_tokens"].device, torch.float32)
        elif live_ref is not None:
            with torch.no_grad():
                ref = torch.stack(split(answer_logps(live_ref, micro).float()), dim=1)
        else:
            ref = None
        return step_math.terms(answer_logps(module, micro), ref, micro["answer_tokens"])

    ctx.info(f"{steps} steps x {batch['global_batch_size']} pairs ({batch['micro_batch_size']} micro x "
             f"{batch['world_size']} rank(s) x {batch['grad_accum']} accumulation), loss {cfg['loss']}, "
             f"beta {cfg['beta']:g}, ZeRO-{ctx.run['deepspeed']['zero_stage']}")
    metrics = train(ctx, engine, total_steps=steps, micro_batches=micro_batches, loss_fn=loss_fn)
    if held:
        heldout["after"] = heldout_metrics(step_math, held, logps_pass(engine, held, micro_size, **mb), ref_h)
        a = heldout["after"]
        ctx.info(f"held-out after: implicit reward accuracy {a['accuracy']:.1%}, margin {a['reward_margin']:.3g}; "
                 f"the policy's likelihood prefers chosen on {a['logp_accuracy']:.1%}")
    live_ref = None  # free the reference before saving
    eng.save_hf(engine, tokenizer, ctx.work_dir / "model", where=ctx.where(), final=True)
    del engine
    out = {**metrics, "ref_seconds": ref_seconds, "data": data["stats"]}
    if heldout:
        out["heldout"] = heldout
    return {"metrics": out, "outputs": {"model": "model"}}
