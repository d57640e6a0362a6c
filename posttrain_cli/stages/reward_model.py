"""Reward model: a scalar head on the base LM trained with the Bradley-Terry pairwise loss.

    stages:
      rm:
        kind: reward_model
        data: [{path: prefs.jsonl}]        # chosen/rejected, or prompt + ranked (best first)
        heldout: [{path: prefs_eval.jsonl}]
        margin: false                      # Llama 2: subtract each row's `margin`

- The model is the input checkpoint under AutoModelForSequenceClassification
  with one label; a causal LM gets a new `score` head from its initializer, an
  earlier reward model keeps its head. The reward of prompt + answer is the head
  read at the answer's last token (its end-of-turn token).
- Loss per pair: -log sigmoid(r(better) - r(worse) - margin). A row ranking K
  answers gives all K(K-1)/2 pairs from one forward of its K answers
  (InstructGPT); with `ranked_weighting: row` (default) each row weighs 1 and
  its pairs 1/C(K,2), as InstructGPT normalises. Llama 3's edited > chosen >
  rejected rows are K = 3.
- Metrics per step and on `heldout` before and after training: pairwise
  accuracy (a tie counts half), mean margin r(better) - r(worse), loss.
- The output `model/` loads with AutoModelForSequenceClassification and as a
  scorer (posttrain_cli.rewards.rm) in later stages: `eval.reward_model: rm`.
- Departures: dropout is off while training (as in TRL and open-instruct).
"""

from __future__ import annotations

import torch

from posttrain_cli.data import preference as pref
from posttrain_cli.engine import deepspeed_engine as eng
from posttrain_cli.engine import dist
from posttrain_cli.engine.inference import eval_mode, load_tokenizer
from posttrain_cli.engine.loop import StepPlan, forward_chunks, total_steps, train
from posttrain_cli.losses.preference import bradley_terry
from posttrain_cli.rewards.rm import scalar_scores


def micro_batch(examples: list[dict], idx: list[int], *, weighting: str, use_margin: bool,
                boundaries: str, mask_dtype, device) -> dict:
    """Every answer of the rows `idx` in one packed row, plus the pairs to compare."""
    seqs, better, worse, pair_w, margins, weight = [], [], [], [], [], 0.0
    for i in idx:
        e = examples[i]
        base = len(seqs)
        seqs.extend(e["answers"])
        pairs = pref.ranked_pairs(len(e["answers"]))
        w = 1.0 / len(pairs) if weighting == "row" else 1.0
        for a, b in pairs:
            better.append(base + a)
            worse.append(base + b)
            pair_w.append(w)
            margins.append(e["margin"] or 0.0)
        weight += w * len(pairs)
    micro = pref.pack_answers(seqs, boundaries, mask_dtype, device)
    micro.update(better=torch.tensor(better, device=device), worse=torch.tensor(worse, device=device),
                 pair_weight=torch.tensor(pair_w, device=device),
                 margin=torch.tensor(margins, device=device) if use_margin else None, weight=weight)
    return micro


def pair_terms(scores: torch.Tensor, micro: dict) -> tuple[torch.Tensor, dict]:
    """-> (weighted loss sum, weighted metric sums) for a micro-batch's pairs."""
    b, w, pw = scores[micro["better"]], scores[micro["worse"]], micro["pair_weight"]
    loss = (bradley_terry(b, w, micro["margin"]) * pw).sum()
    diff = (b - w).detach()
    acc = (diff > 0).float() + 0.5 * (diff == 0).float()
    return loss, {"accuracy": float((acc * pw).sum()), "margin": float((diff * pw).sum()),
                  "better_reward": float((b.detach() * pw).sum()), "worse_reward": float((w.detach() * pw).sum())}


@torch.no_grad()
def heldout_metrics(module, examples: list[dict], micro_size: int, **mb) -> dict | None:
    """Pairwise accuracy, mean margin and loss over held-out rows, every pair weighted 1, split over ranks."""
    if not examples:
        return None
    sums = torch.zeros(4, dtype=torch.float64)
    with eval_mode(module):
        for chunk in forward_chunks(len(examples), micro_size):
            micro = micro_batch(examples, chunk or [0], weighting="pair", **mb)
            loss, extra = pair_terms(scalar_scores(module, micro), micro)
            if chunk is not None:
                sums += torch.tensor([float(loss), extra["accuracy"], extra["margin"],
                                      float(micro["pair_weight"].sum())], dtype=torch.float64)
    loss, acc, margin, pairs = dist.all_sum(sums.tolist())
    return {"accuracy": acc / pairs, "margin": margin / pairs, "loss": loss / pairs, "pairs": int(pairs)}


def run(ctx) -> dict:
    cfg = ctx.cfg
    model_cfg = ctx.run["model"]
    tokenizer = load_tokenizer(ctx.input_model, model_cfg)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = pref.prepare(ctx, tokenizer, need_margin=cfg["margin"])
    examples, held = data["train"], data["heldout"]

    steps = total_steps(cfg, len(examples), ctx.where(), "preference rows")
    batch = ctx.arith
    ds_cfg = eng.train_ds_config(ctx)
    model = eng.load_scorer(ctx.input_model, model_cfg, ds_cfg, train=True, pad_token_id=tokenizer.pad_token_id,
                            quantize=eng.quantize_of(ctx))
    eng.disable_dropout(model)
    model = eng.trainable(ctx, model, score_head=True)
    engine = eng.initialize(model, ds_cfg, cfg, steps)
    mb = dict(use_margin=cfg["margin"], **eng.pack_options(ctx.run, engine.device))
    plan = StepPlan(len(examples), batch, ctx.seed)

    def micro_batches(step: int) -> list[dict]:
        return [micro_batch(examples, idx, weighting=cfg["ranked_weighting"], **mb)
                for idx in plan.micro_indices(step, dist.rank(), dist.world())]

    def loss_fn(module, micro) -> tuple:
        return pair_terms(scalar_scores(module, micro), micro)

    heldout = {"before": heldout_metrics(engine, held, batch["micro_batch_size"], **mb)}
    if heldout["before"]:
        ctx.info(f"held-out before: pairwise accuracy {heldout['before']['accuracy']:.1%} "
                 f"on {heldout['before']['pairs']} pairs")
    ctx.info(f"{steps} steps x {batch['global_batch_size']} preference rows "
             f"({batch['micro_batch_size']} micro x {batch['world_size']} rank(s) x {batch['grad_accum']} accumulation), "
             f"ZeRO-{ctx.run['deepspeed']['zero_stage']}")
    metrics = train(ctx, engine, total_steps=steps, micro_batches=micro_batches, loss_fn=loss_fn)
    heldout["after"] = heldout_metrics(engine, held, batch["micro_batch_size"], **mb)
    if heldout["after"]:
        ctx.info(f"held-out after: pairwise accuracy {heldout['after']['accuracy']:.1%}, "
                 f"mean margin {heldout['after']['margin']:.3g}")
    eng.save_hf(engine, tokenizer, ctx.work_dir / "model", where=ctx.where(), final=True)
    del engine, model
    out = {**metrics, "data": data["stats"]}
    if heldout["after"]:
        out["heldout"] = heldout
    return {"metrics": out, "outputs": {"model": "model"}}
