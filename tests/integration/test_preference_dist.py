"""reward_model and every DPO-family loss on the tiny model, 1 rank (ZeRO-2) and 2 ranks (ZeRO-3).

One recipe: sft, then a reward model and one dpo stage per loss from sft, plus the variants
that must agree with the plain dpo stage (a live reference instead of cached log-probs) or
differ from it (a reference other than the input: sft_ref, sft trained a few steps more).
The 2-rank run keeps what distribution can change: the reward model, the plain dpo stage
with cached and with live reference log-probs, and an eval scored by the reward model (the
losses are pure functions of the same gathered log-probs; each torchrun launch costs ~10 s). It
starts from the 1-rank run's sft model (SFT on 2 ranks: tests/integration/test_sft_dist.py), so
both runs' stages start from the same weights.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from posttrain_cli.kinds.dpo import LOSSES as DPO_LOSSES
from tests.conftest import stage_manifest, stage_rows, mini_recipe, posttrain, sft_stage, tiny_rows, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

DPO_STAGE = """
{name}:
  kind: dpo
  from: {sft}
  data: [{{path: {pref}}}]
  heldout: [{{path: {held}}}]
  loss: {loss}
  beta: {beta}
  lr: 1.0e-3
  max_steps: 8
  global_batch_size: 16
  micro_batch_size: 4
  max_seq_len: 64
  warmup_ratio: 0.0
  {extra}
"""

# beta per loss: ipo's target margin 1/(2 beta) and dpo_norm's per-token scale want their own.
BETAS = {"dpo": 0.5, "dpo_norm": 5.0, "ipo": 0.5, "simpo": 2.0, "hinge": 0.5}


def _easy(row: dict) -> dict:
    """A preference a 20-step model can learn: the right sum over a refusal."""
    return {**row, "rejected": row["rejected"][:-1] + [{"role": "assistant", "content": "no"}]}


def _sft(name: str, train: Path, steps: int, from_: str | None = None) -> str:
    return sft_stage(name, from_=from_, data=train, lr=3.0e-3, max_steps=steps, global_batch_size=32,
                     micro_batch_size=16)


def _recipe(tmp: Path, name: str, every_loss: bool, sft: Path | None = None) -> Path:
    """The stages after an sft stage of their own, or from the model `sft` (a path) when given."""
    lines = lambda f, n: [_easy(r) for r in tiny_rows(f, n)]  # noqa: E731
    pref = write_jsonl(tmp / "pref.jsonl", lines("pref_train.jsonl", 256))
    held = write_jsonl(tmp / "held.jsonl", lines("pref_eval.jsonl", 48))
    stages = _sft("sft", tmp / "train.jsonl", 10) if sft is None else ""
    sft = sft or "sft"
    stages += textwrap.dedent(f"""
      rm:
        kind: reward_model
        from: {sft}
        data: [{{path: {pref}}}]
        heldout: [{{path: {held}}}]
        lr: 3.0e-3
        max_steps: 12
        global_batch_size: 16
        micro_batch_size: 4
        max_seq_len: 64
        warmup_ratio: 0.0
    """)
    for loss in DPO_LOSSES if every_loss else ("dpo",):
        stages += DPO_STAGE.format(name=f"dpo_{loss}", sft=sft, pref=pref, held=held, loss=loss,
                                   beta=BETAS[loss], extra="")
    stages += DPO_STAGE.format(name="dpo_live", sft=sft, pref=pref, held=held, loss="dpo", beta=BETAS["dpo"],
                               extra="precompute_ref: false")
    if every_loss:
        # sft_ref: two policies, so one dpo stage can take a reference other than its input.
        stages += _sft("sft_ref", tmp / "train.jsonl", 4, from_="sft")
        stages += DPO_STAGE.format(name="dpo_ref0", sft=sft, pref=pref, held=held, loss="dpo",
                                   beta=BETAS["dpo"], extra="ref_from: sft_ref\n  nll_weight: 0.2")
    stages += textwrap.dedent(f"""
      rm_eval:
        kind: eval
        from: dpo_dpo
        data: [{{path: {tmp}/eval.jsonl}}]
        max_new_tokens: 4
        reward_model: rm
    """)
    return mini_recipe(tmp, stages=stages, name=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pref")
    out = {}
    for name, args in {"1rank": ["deepspeed=zero2"],
                       "2rank_zero3": ["deepspeed=zero3", "cluster.nproc_per_node=2"]}.items():
        sft = out["1rank"] / "sft" / "model" if out else None
        rec = _recipe(tmp, f"pref_{name}", every_loss=name == "1rank", sft=sft)
        run_dir = tmp / "runs" / name
        r = posttrain("run", f"recipe={rec}", f"run_dir={run_dir}", *args, cwd=tmp, timeout=900)
        assert r.returncode == 0, f"{name}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        out[name] = run_dir
    out["stdout"] = r.stdout
    return out



@pytest.mark.parametrize("setup,loss", [*(("1rank", loss) for loss in DPO_LOSSES), ("2rank_zero3", "dpo")])
def test_each_loss_trains(runs, setup, loss):
    """The loss falls and the held-out implicit reward comes to prefer chosen answers."""
    rows = stage_rows(runs[setup], f"dpo_{loss}")
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"], (first, last)
    assert last["reward_margin"] > first["reward_margin"]
    held = stage_manifest(runs[setup], f"dpo_{loss}")["metrics"]["heldout"]
    if loss != "simpo":  # the reference is the starting policy: every implicit reward starts at 0
        assert held["before"]["accuracy"] == 0.5 and held["before"]["reward_margin"] == 0.0
    assert held["after"]["accuracy"] > 0.7, held["after"]
    assert held["after"]["logp_accuracy"] >= held["before"]["logp_accuracy"]
    assert held["after"]["reward_margin"] > held["before"]["reward_margin"]


def test_two_rank_zero3_follows_the_one_rank_curve(runs):
    one = [r["loss"] for r in stage_rows(runs["1rank"], "dpo_dpo")]
    two = [r["loss"] for r in stage_rows(runs["2rank_zero3"], "dpo_dpo")]
    assert two == pytest.approx(one, rel=2e-3, abs=2e-4)


@pytest.mark.parametrize("setup", ["1rank", "2rank_zero3"])
def test_cached_reference_equals_a_live_reference(runs, setup):
    """Same stage, precomputed reference log-probs vs a live reference model: the same run."""
    cached, live = stage_rows(runs[setup], "dpo_dpo"), stage_rows(runs[setup], "dpo_live")
    for key in ("loss", "chosen_reward", "rejected_reward", "chosen_logps"):
        assert [r[key] for r in live] == pytest.approx([r[key] for r in cached], rel=1e-4, abs=1e-5), key
    a, b = (stage_manifest(runs[setup], s)["metrics"]["heldout"]["after"] for s in ("dpo_dpo", "dpo_live"))
    assert b["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-4, abs=1e-5)


def test_a_reference_other_than_the_input_model(runs):
    """ref_from: sft_ref while training from sft: rewards are not zero at the first step, the policy
    already differs from its reference; nll_weight shows as a metric and lowers chosen NLL."""
    rows = stage_rows(runs["1rank"], "dpo_ref0")
    assert abs(rows[0]["chosen_reward"]) > 1e-3
    held = stage_manifest(runs["1rank"], "dpo_ref0")["metrics"]["heldout"]
    assert held["before"]["reward_margin"] != 0.0
    assert rows[-1]["nll"] < rows[0]["nll"]


@pytest.mark.parametrize("setup", ["1rank", "2rank_zero3"])
def test_reward_model_learns(runs, setup):
    rows = stage_rows(runs[setup], "rm")
    assert rows[-1]["loss"] < rows[0]["loss"]
    held = stage_manifest(runs[setup], "rm")["metrics"]["heldout"]
    assert held["after"]["accuracy"] >= max(0.9, held["before"]["accuracy"])
    assert held["after"]["margin"] > held["before"]["margin"] + 0.5


def test_reward_model_two_ranks_follow_one(runs):
    one = [r["loss"] for r in stage_rows(runs["1rank"], "rm")]
    two = [r["loss"] for r in stage_rows(runs["2rank_zero3"], "rm")]
    assert two == pytest.approx(one, rel=2e-3, abs=2e-4)


def test_reward_model_reloads_as_a_scorer(runs):
    """The rm stage's model: AutoModelForSequenceClassification's own padded forward and
    posttrain's packed scorer give the same rewards, and the scorer's held-out pairwise
    accuracy is the one the stage reported."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain_cli.data.schemas import preference_row
    from posttrain_cli.pipeline.worker import quiet_libraries
    from posttrain_cli.rewards.rm import RewardScorer

    quiet_libraries()
    path = runs["1rank"] / "rm" / "model"
    held = [preference_row(json.loads(l), "held", i)
            for i, l in enumerate((runs["1rank"].parent.parent / "held.jsonl").read_text().splitlines(), 1)]
    ds = {"zero_stage": 0, "precision": "fp32", "offload_optimizer": False, "offload_param": False}
    scorer = RewardScorer(str(path), {"trust_remote_code": False, "attn_implementation": None}, ds, batch_size=7)
    prompts = [r["prompt"] for r in held for _ in (0, 1)]
    answers = [r["responses"][k]["content"] for r in held for k in (0, 1)]
    scores = scorer.score(prompts, answers)
    acc = sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(held))) / len(held)
    reported = stage_manifest(runs["1rank"], "rm")["metrics"]["heldout"]["after"]["accuracy"]
    assert acc == pytest.approx(reported, abs=1e-9)

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": a}], tokenize=False)
             for p, a in zip(prompts[:8], answers[:8])]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        hf = model(**enc).logits[:, 0]
    assert hf.tolist() == pytest.approx(scores[:8], abs=1e-4)


def test_eval_scores_generations_with_the_reward_model(runs):
    for setup in ("1rank", "2rank_zero3"):
        after = stage_manifest(runs[setup], "rm_eval")["metrics"]["eval"]["after"]
        assert isinstance(after["reward"], float) and after["n"] == 16
    assert "pref before" in runs["stdout"] and "pref after" in runs["stdout"]
