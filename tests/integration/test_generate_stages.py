"""generate and rejection_sampling on the tiny model: generated rows feed a later sft stage,
best-of-K by a tiny reward model, all_pass by the `number` verifier, seeded sampling, 2 ranks
(ZeRO-3) writing the rows of 1 rank in the same order, and bad input exiting 2.

The verifier stage samples from a model taught to answer "7" to every sum (30 SFT steps):
half of its prompts have ground truth "7", so some samples pass and others do not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain_cli.data.schemas import open_prompt_row, sft_messages
from posttrain_cli.rewards import VERIFIERS
from tests.conftest import mini_recipe, posttrain, sft_stage, stage_manifest, tiny_rows, write_jsonl
from tests.e2e.test_bad_input import _check

pytestmark = pytest.mark.slow

SAMPLING = """
    max_new_tokens: 6
    max_seq_len: 64"""

# Stage templates: _recipe fills in {tmp}, {sft}, {rm} and {gen_from} with str.format.
STAGES = {
    "sft": sft_stage(data="[{{path: {tmp}/train.jsonl}}]", lr=3.0e-3, max_steps=10),
    "gen": """
  gen:
    kind: generate{gen_from}
    data: [{{path: {tmp}/prompts.jsonl}}]
    num_generations: 2
    drop_truncated: false""" + SAMPLING,
    # The same sampling as gen (same seed): its rows must be gen's rows that ended with EOS.
    "gen_eos": """
  gen_eos:
    kind: generate
    from: sft
    data: [{{path: {tmp}/prompts.jsonl}}]
    num_generations: 2""" + SAMPLING,
    "sft_gen": sft_stage("sft_gen", from_="sft", data="[{{from: gen}}]", max_steps=2, global_batch_size=8,
                         micro_batch_size=4),
    "rm": """
  rm:
    kind: reward_model
    from: sft
    data: [{{path: {tmp}/pref.jsonl}}]
    lr: 3.0e-3
    max_steps: 3
    global_batch_size: 16
    micro_batch_size: 8
    max_seq_len: 64""",
    "rs_rm": """
  rs_rm:
    kind: rejection_sampling
    from: {sft}
    data: [{{path: {tmp}/prompts.jsonl}}]
    reward_model: {rm}
    rm_weight: 2.0
    num_samples: 4
    drop_truncated: false""" + SAMPLING,
    "sft_7": sft_stage("sft_7", from_="sft", data="[{{path: {tmp}/sevens.jsonl}}]", lr=1.0e-2, max_steps=30),
    "rs_verifier": """
  rs_verifier:
    kind: rejection_sampling
    data: [{{path: {tmp}/verify.jsonl}}]
    verifier: number
    keep: all_pass
    num_samples: 4
    max_per_prompt: 2""" + SAMPLING,
}
ONE_RANK = ["sft", "gen", "gen_eos", "sft_gen", "rm", "rs_rm", "sft_7", "rs_verifier"]


def _recipe(tmp: Path, names: list[str], extra: str = "", file: str = "gen", models: dict | None = None) -> Path:
    """The stages `names`; `models` may replace the sft and rm stages by model paths."""
    prompts = tiny_rows("sft_eval.jsonl", 12)
    write_jsonl(tmp / "prompts.jsonl", prompts)
    write_jsonl(tmp / "verify.jsonl", [dict(r, ground_truth="7" if i % 2 == 0 else "8") for i, r in enumerate(prompts)])
    sevens = tiny_rows("sft_train.jsonl", 256)
    write_jsonl(tmp / "sevens.jsonl", [{"messages": [r["messages"][0], {"role": "assistant", "content": "7"}]}
                                       for r in sevens])
    write_jsonl(tmp / "pref.jsonl", tiny_rows("pref_train.jsonl", 64, parse=False))
    refs = {"sft": "sft", "rm": "rm", "gen_from": "", **(models or {})}
    stages = [STAGES[n].format(tmp=tmp, **refs) for n in names] + [extra]
    rec = mini_recipe(tmp, stages=stages, name="gen")
    return rec.rename(tmp / f"{file}.yaml")


def _run(tmp: Path, names: list[str], *args: str, models: dict | None = None) -> Path:
    rec = _recipe(tmp, names, models=models)
    r = posttrain("run", f"recipe={rec}", *args, cwd=tmp, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return tmp / "runs" / "gen"


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("one"), ONE_RANK)


@pytest.fixture(scope="module")
def two(tmp_path_factory, one) -> Path:
    """gen and rs_rm on 2 ranks (ZeRO-3), sampling the 1-rank run's sft model, scored by its rm."""
    sft, rm = one / "sft" / "model", one / "rm" / "model"
    return _run(tmp_path_factory.mktemp("two"), ["gen", "rs_rm"], "cluster.nproc_per_node=2", "deepspeed=zero3",
                models={"sft": sft, "rm": rm, "gen_from": f"\n    from: {sft}"})


def rows(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(l) for l in (run_dir / stage / "data.jsonl").read_text().splitlines()]


def test_generate_writes_sft_rows_in_prompt_order(one):
    got = rows(one, "gen")
    prompts = [json.loads(l) for l in (one.parent.parent / "prompts.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in got] == [(p, s) for p in range(12) for s in range(2)]
    for n, r in enumerate(got, 1):
        src = prompts[r["prompt_index"]]
        assert r["messages"][:-1] == src["messages"] and r["messages"][-1]["role"] == "assistant"
        assert r["ground_truth"] == src["ground_truth"] and r["dataset"] == "add" and "src" not in r
        assert sft_messages(r, "gen", n) == r["messages"]
        assert open_prompt_row(r, "gen", n)["messages"] == src["messages"]
    m = stage_manifest(one, "gen")["metrics"]
    eos = [r["finish_reason"] == "eos" for r in got]
    assert m["prompts"] == 12 and m["rows"] == 24 and m["truncated_dropped"] == 0
    assert m["eos_rate"] == pytest.approx(sum(eos) / 24)
    assert 0 < m["mean_length"] <= 6 and m["seconds"] > 0


def test_generate_is_seeded_and_drops_truncated_completions(one):
    """gen_eos samples exactly what gen sampled (same seed, same config) and keeps those with EOS."""
    every, kept = rows(one, "gen"), rows(one, "gen_eos")
    with_eos = [r for r in every if r["finish_reason"] == "eos"]
    assert 0 < len(with_eos) < len(every), "the test needs both endings; change the SFT steps"
    assert kept == with_eos
    m = stage_manifest(one, "gen_eos")["metrics"]
    assert m["rows"] == len(kept) and m["truncated_dropped"] == len(every) - len(kept)


def test_a_later_sft_stage_trains_on_the_generated_rows(one):
    m = stage_manifest(one, "sft_gen")
    assert m["status"] == "completed" and m["inputs"]["datasets"] == {"gen": str(one / "gen" / "data.jsonl")}
    assert m["metrics"]["data"]["rows"] == 24 and m["metrics"]["steps"] == 2


def test_rejection_sampling_keeps_the_reward_models_best_of_k(one):
    got = rows(one, "rs_rm")
    m = stage_manifest(one, "rs_rm")["metrics"]
    assert [r["prompt_index"] for r in got] == list(range(12)), "best-of-K without threshold: one row per prompt"
    for r in got:
        k = r["sample_scores"]
        assert len(k) == 4 and r["score"] == max(k) and k.index(max(k)) == r["sample_index"]
        assert r["score"] == pytest.approx(2.0 * r["rm_score"])  # rm_weight 2
        assert "scores" not in r
    assert m["acceptance_rate"] == len({r["prompt_index"] for r in got}) / m["prompts"] == 1.0
    assert m["mean_best_score"] == pytest.approx(sum(r["score"] for r in got) / 12)
    assert m["mean_score"] == pytest.approx(sum(s for r in got for s in r["sample_scores"]) / 48)
    assert m["rows"] == 12 and m["samples"] == 48


def test_rejection_sampling_keeps_all_that_pass_the_verifier(one):
    got = rows(one, "rs_verifier")
    m = stage_manifest(one, "rs_verifier")["metrics"]
    assert got and m["rows"] == len(got)
    by_prompt: dict[int, list[dict]] = {}
    for r in got:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
        answer = r["messages"][-1]["content"]
        assert VERIFIERS["number"](answer, r["ground_truth"], r) == 1.0
        assert r["scores"] == {"number": 1.0} and r["score"] == 1.0 and r["finish_reason"] == "eos"
    for group in by_prompt.values():
        answers = [r["messages"][-1]["content"] for r in group]
        assert len(answers) <= 2 and len(set(answers)) == len(answers), "distinct, at most max_per_prompt"
    assert m["acceptance_rate"] == pytest.approx(len(by_prompt) / 12)
    assert m["acceptance_rate"] >= 0.25, "the '7' model should pass about half the prompts"
    assert m["accuracy/number"] == pytest.approx(m["mean_score"])
    assert m["mean_best_score"] >= m["acceptance_rate"] - 1e-9  # a truncated pass counts in the best score only


@pytest.mark.dist
def test_two_ranks_zero3_write_the_rows_of_one_rank_in_the_same_order(one, two):
    for stage in ("gen", "rs_rm"):
        a, b = rows(one, stage), rows(two, stage)
        assert len(a) == len(b)
        assert [(r["prompt_index"], r["sample_index"] if stage == "gen" else 0, r["messages"][:-1]) for r in a] == \
            [(r["prompt_index"], r["sample_index"] if stage == "gen" else 0, r["messages"][:-1]) for r in b]
        assert stage_manifest(two, stage)["metrics"]["prompts"] == 12
    for r in rows(two, "rs_rm"):
        assert r["score"] == max(r["sample_scores"])


# -- bad input: exit 2, one line --

def test_rows_from_a_generated_dataset_without_a_verifier(one):
    """Rows read from an earlier stage's dataset are checked by the stage itself (not the pre-flight)."""
    tmp = one.parent.parent
    rec = _recipe(tmp, ONE_RANK, file="bad_rows", extra="""
  rs_bad:
    kind: rejection_sampling
    from: sft
    data: [{from: gen}]
    num_samples: 2""")
    _check(posttrain("run", f"recipe={rec}", cwd=tmp), "gen/data.jsonl: row 1", "'add'", "stages.rs_bad.verifier")
    assert not (one / "rs_bad" / "data.jsonl").exists()


def test_rejection_sampling_without_a_reward(one):
    tmp = one.parent.parent
    rec = _recipe(tmp, ONE_RANK, file="no_reward")
    _check(posttrain("run", f"recipe={rec}", "stages.rs_rm.reward_model=null", cwd=tmp),
           "prompts.jsonl: row 1", "stages.rs_rm.verifier")


def test_keeping_nothing_fails_instead_of_publishing_an_empty_dataset(one):
    tmp = one.parent.parent
    rec = _recipe(tmp, ONE_RANK, file="strict", extra=f"""
  rs_strict:
    kind: rejection_sampling
    from: sft_7
    data: [{{path: {tmp}/verify.jsonl}}]
    verifier: number
    threshold: 2.0
    num_samples: 2""" + SAMPLING)
    _check(posttrain("run", f"recipe={rec}", cwd=tmp), "stages.rs_strict: kept no completion of 12 prompts x 2",
           "below threshold 2", "lower stages.rs_strict.threshold")
    assert not (one / "rs_strict" / "data.jsonl").exists()
    assert stage_manifest(one, "rs_strict")["status"] == "failed"
