"""Rounds blocks, branches (waves) and the config of the generation / combination kinds:
what each expands to, and each mistake a user can make as one line naming the key."""

from __future__ import annotations

import pytest

from posttrain_cli.config.compose import compose
from posttrain_cli.errors import UserError
from posttrain_cli.pipeline import graph, runner, stagedir
from posttrain_cli.ui import waves
from tests.conftest import TINY_DATA, write_recipe

SFT = TINY_DATA / "sft_train.jsonl"
PREF = TINY_DATA / "pref_train.jsonl"
RL = TINY_DATA / "rl_train.jsonl"

LLAMA3 = f"""
defaults: [base, _self_]
name: l3
stages:
  base: {{kind: sft, data: [{SFT}], max_steps: 2}}
  loop:
    kind: rounds
    count: 3
    initial: {{dpo: base}}
    stages:
      rm: {{kind: reward_model, from: base, data: [{PREF}], max_steps: 2}}
      rs: {{kind: rejection_sampling, from: prev.dpo, reward_model: rm, data: [{RL}], num_samples: 4}}
      ft: {{kind: sft, from: base, data: [{{from: rs}}, {{from: prev.rs}}, {{path: "{TINY_DATA}/sft_{{round}}.jsonl"}}], max_steps: 2}}
      dpo: {{kind: dpo, from: ft, data: [{PREF}], max_steps: 2}}
  final: {{kind: eval, from: loop.dpo, data: [{RL}]}}
"""


def _cfg(tmp_path, body: str, *overrides: str) -> dict:
    cfg, _ = compose([f"recipe={write_recipe(tmp_path, body)}", f"run_dir={tmp_path / 'runs'}", *overrides])
    return cfg


def _error(tmp_path, body: str, *overrides: str) -> str:
    with pytest.raises(UserError) as e:
        runner.plan(_cfg(tmp_path, body, *overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_rounds_expand_in_order_with_this_and_previous_rounds_outputs(tmp_path):
    stages = _cfg(tmp_path, LLAMA3)["stages"]
    assert list(stages) == ["base", *[f"r{r}.{s}" for r in (1, 2, 3) for s in ("rm", "rs", "ft", "dpo")], "final"]
    # Round 1: prev.dpo is the block's `initial` entry; prev.rs has none, so that source is dropped.
    assert stages["r1.rs"]["from"] == "base" and stages["r1.rs"]["reward_model"] == "r1.rm"
    assert [s["from"] for s in stages["r1.ft"]["data"]] == ["r1.rs", None]
    assert stages["r1.ft"]["data"][1]["path"].endswith("sft_1.jsonl")
    # Round 3 reads round 2's outputs and its own.
    assert stages["r3.rs"]["from"] == "r2.dpo" and stages["r3.rs"]["reward_model"] == "r3.rm"
    assert [s["from"] for s in stages["r3.ft"]["data"]] == ["r3.rs", "r2.rs", None]
    assert stages["r3.ft"]["data"][2]["path"].endswith("sft_3.jsonl")
    assert stages["r3.dpo"]["from"] == "r3.ft" and stages["r2.rm"]["from"] == "base"
    # A stage after the block names the last round's stage as <block>.<name>.
    assert stages["final"]["from"] == "r3.dpo"


def test_round_count_is_one_override(tmp_path):
    stages = _cfg(tmp_path, LLAMA3, "stages.loop.count=1", "stages.loop.stages.dpo.beta=0.5")["stages"]
    assert [n for n in stages if n.startswith("r")] == ["r1.rm", "r1.rs", "r1.ft", "r1.dpo"]
    assert stages["r1.dpo"]["beta"] == 0.5 and stages["final"]["from"] == "r1.dpo"


def test_round_graph_and_waves(tmp_path):
    steps = runner.plan(_cfg(tmp_path, LLAMA3, "stages.loop.count=2"))
    deps = {s.node.name: s.node.deps for s in steps}
    assert deps["r2.rs"] == ["r1.dpo", "r2.rm"] and deps["r2.ft"] == ["base", "r1.rs", "r2.rs"]
    w = waves(steps)
    # Every round's reward model needs only `base`: they are branches of one wave.
    assert w["base"] == 1 and w["r1.rm"] == w["r2.rm"] == 2
    assert w["r1.rs"] == 3 and w["r1.dpo"] == 5 and w["r2.rs"] == 6 and w["final"] == 9


@pytest.mark.parametrize("edit, expected", [
    (("count: 3", "count: 0"), "stages.loop.count=0 must be >= 1"),
    (("count: 3", "cuont: 3"), "did you mean 'count'"),
    (("from: prev.dpo", "from: prev.dop"), "stages.loop.stages.rs.from='prev.dop': no stage 'dop' in the block"),
    (("initial: {dpo: base}", "initial: {dpp: base}"), "stages.loop.initial.dpp: no stage 'dpp' in the block"),
    (("from: loop.dpo", "from: loop.dop"), "stages.final.from='loop.dop': block 'loop' has no stage 'dop'"),
    (("      rm: {kind: reward_model", "      base: {kind: reward_model"), "a stage outside the block is also named"),
    (("max_steps: 2}\n  final", "max_step: 2}\n  final"), "unknown key 'stages.loop.stages.dpo.max_step'"),
])
def test_round_mistakes_name_the_key(tmp_path, edit, expected):
    assert expected in _error(tmp_path, LLAMA3.replace(*edit))


def test_dotted_stage_names_are_reserved_for_rounds(tmp_path):
    body = f"defaults: [base, _self_]\nname: x\nstages:\n  a.b: {{kind: sft, data: [{SFT}]}}\n"
    assert "may not contain '.'" in _error(tmp_path, body)


def _stages(body: str) -> str:
    return f"defaults: [base, _self_]\nname: x\nstages:\n  a: {{kind: sft, data: [{SFT}], max_steps: 1}}\n" \
           f"  b: {{kind: sft, data: [{SFT}], max_steps: 1}}\n  rm: {{kind: reward_model, data: [{PREF}], max_steps: 1}}\n" + body


def test_merge_base_may_not_be_one_of_the_models(tmp_path):
    assert "stages.m.base 'a' is also one of the models" in _error(
        tmp_path, _stages("  m: {kind: merge, method: ties, models: [a, b], base: a}\n"))


def test_merge_graph(tmp_path):
    body = _stages("  c: {kind: sft, from: a, data: [" + str(SFT) + "], max_steps: 1}\n"
                   "  m: {kind: merge, method: dare_ties, models: [b, c], base: a, density: [0.3, 0.6]}\n"
                   "  after: {kind: sft, data: [" + str(SFT) + "], max_steps: 1}\n")
    steps = {s.node.name: s for s in runner.plan(_cfg(tmp_path, body))}
    m = steps["m"].node
    assert m.model_input is None and m.deps == ["a", "b", "c"]
    assert m.refs == {"models[0]": ("stage", "b"), "models[1]": ("stage", "c"), "base": ("stage", "a")}
    # The merged model is the next stage's default input.
    assert steps["after"].node.model_input == ("stage", "m")
    assert waves(list(steps.values()))["m"] == 3


@pytest.mark.parametrize("stage, expected", [
    ("{kind: merge, method: ties, models: [a, b]}", "stages.m.base is required for method ties"),
    ("{kind: merge, method: linear, models: [a, b], base: a}", "base is used only by"),
    ("{kind: merge, method: slerp, models: [a, b, rm]}", "slerp interpolates exactly 2 models"),
    ("{kind: merge, models: [a, b], weights: [1]}", "stages.m.weights must be 2 numbers"),
    ("{kind: merge, models: [a, b], from: a}", "a merge stage reads the models listed in"),
    ("{kind: merge, method: ties, models: [a, b], base: rm, density: 1.5}", "stages.m.density=1.5"),
    ("{kind: merge, models: [a, rm]}", "stages.m.models[1]: stage 'rm' is a reward_model stage"),
    ("{kind: merge, models: [a, nosuch]}", "stages.m.models[1]='nosuch' names no stage"),
    ("{kind: merge, models: [a, b], max_shard_size: lots}", "stages.m.max_shard_size='lots' is not a size"),
    ("{kind: merge, models: [a, b], eval: {data: [" + str(RL) + "], before: true}}", "stages.m.eval.before"),
    ("{kind: rejection_sampling, reward_model: null, verifier: nope, data: [" + str(RL) + "]}",
     "stages.m.verifier='nope' is not a verifier"),
    ("{kind: rejection_sampling, reward_model: rm, num_samples: 1, data: [" + str(RL) + "]}",
     "best-of-K needs K >= 2"),
    ("{kind: rejection_sampling, reward_model: rm, keep: all_pass, data: [" + str(RL) + "]}",
     "stages.m.threshold is required with keep: all_pass and a reward model"),
    ("{kind: rejection_sampling, reward_model: a, data: [" + str(RL) + "]}",
     "stages.m.reward_model: stage 'a' is a sft stage and produces no reward model"),
    ("{kind: generate, data: []}", "stages.m.data is empty: a generate stage needs prompts"),
    ("{kind: generate, num_generations: 0, data: [" + str(RL) + "]}", "stages.m.num_generations=0 must be > 0"),
    ("{kind: distill, teachers: {}, data: [" + str(RL) + "]}", "stages.m.teachers is empty"),
    ("{kind: distill, teachers: {add: rm}, data: [" + str(RL) + "]}",
     "stages.m.teachers.add: stage 'rm' is a reward_model stage"),
    ("{kind: distill, teachers: {add: a}, teacher_weights: {sub: 1}, combine: mixture, data: [" + str(RL) + "]}",
     "stages.m.teacher_weights.sub: no such teacher"),
    ("{kind: distill, teachers: {add: a}, alpha: 0.5, num_generations: 1, data: [" + str(RL) + "]}",
     "the outcome advantage (alpha > 0) is centred within each prompt's group"),
    ("{kind: distill, teachers: {add: a}, eval_every: 5, data: [" + str(RL) + "]}",
     "stages.m.eval_every needs held-out prompts"),
])
def test_new_kind_mistakes_name_the_key(tmp_path, stage, expected):
    assert expected in _error(tmp_path, _stages(f"  m: {stage}\n"))


def test_distill_rows_route_to_a_teacher_before_anything_trains(tmp_path):
    body = _stages("  m: {kind: distill, teachers: {sub: a}, prompts_per_step: 4, micro_batch_size: 4, "
                   f"max_steps: 1, data: [{RL}]}}\n")
    cfg = _cfg(tmp_path, body)
    with pytest.raises(UserError) as e:
        runner.preflight(cfg, runner.plan(cfg))
    assert f"{RL}: row 1: dataset 'add' has no teacher in stages.m.teachers (known: sub)" in str(e.value)


def test_rejection_sampling_rows_resolve_to_verifiers_before_anything_trains(tmp_path):
    body = _stages(f"  m: {{kind: rejection_sampling, data: [{RL}]}}\n")
    cfg = _cfg(tmp_path, body)
    with pytest.raises(UserError) as e:
        runner.preflight(cfg, runner.plan(cfg))
    assert "row 1" in str(e.value) and "add" in str(e.value)


def test_list_and_mapping_references_reach_the_stage_spec(tmp_path):
    (tmp_path / "base-model").mkdir()
    body = _stages(f"  m: {{kind: merge, method: task_arithmetic, models: [a, b], base: {tmp_path / 'base-model'}}}\n")
    cfg = _cfg(tmp_path, body)
    step = next(s for s in runner.plan(cfg) if s.node.name == "m")
    spec = stagedir.write_spec(cfg, step, eval_only=False).read_text()
    assert "models[0]:" in spec and "models[1]:" in spec and f"base: {tmp_path / 'base-model'}" in spec
    assert graph.model_refs(step.node.cfg) == {"models[0]": "a", "models[1]": "b", "base": str(tmp_path / "base-model")}
