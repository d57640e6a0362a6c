"""Config validation: each error a user can make is one line naming the key or stage."""

from __future__ import annotations

import pytest

from posttrain_cli.config.compose import compose
from posttrain_cli.kinds.batch import training_batch as batch_arithmetic
from posttrain_cli.errors import UserError
from posttrain_cli.pipeline import runner
from tests.conftest import mini_recipe, write_recipe


def _error(args) -> str:
    with pytest.raises(UserError) as e:
        cfg, _ = compose(args)
        runner.plan(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_compose_tiny_defaults():
    cfg, path = compose(["recipe=tiny"])
    assert path.name == "tiny.yaml"
    assert cfg["model"]["path"] == "tiny"
    sft = cfg["stages"]["sft"]
    # A key the recipe leaves out still gets its schema default.
    assert sft["packing"] is True and sft["truncation"] == "truncate"
    assert cfg["run_dir"] == "runs/tiny"


def test_overrides_reach_keys_the_recipe_did_not_set(tmp_path):
    cfg, _ = compose([f"recipe={mini_recipe(tmp_path)}", "stages.sft.warmup_ratio=0.2", "deepspeed=zero3",
                      "cluster.nproc_per_node=2", "seed=7", "name=other"])
    assert cfg["stages"]["sft"]["warmup_ratio"] == 0.2
    assert cfg["deepspeed"]["zero_stage"] == 3
    assert cfg["cluster"]["nproc_per_node"] == 2
    assert cfg["seed"] == 7


def test_run_dir_interpolation_follows_name():
    cfg, _ = compose(["recipe=tiny", "name=exp1"])
    assert cfg["run_dir"] == "runs/exp1"


def test_unknown_key_in_override(tmp_path):
    msg = _error([f"recipe={mini_recipe(tmp_path)}", "stages.sft.lrr=1"])
    assert "stages.sft.lrr" in msg and "did you mean 'lr'" in msg


def test_unknown_top_level_key():
    assert "unknown key 'sed'" in _error(["recipe=tiny", "sed=1"])


def test_unknown_key_in_recipe_file(tmp_path):
    rec = mini_recipe(tmp_path)
    rec.write_text(rec.read_text().replace("lr: 1.0e-3", "lrr: 1.0e-3", 1))
    assert "unknown key 'stages.sft.lrr'" in _error([f"recipe={rec}"])


def test_unknown_stage_in_override():
    msg = _error(["recipe=tiny", "stages.ppo.beta=5"])
    assert "unknown stage 'ppo'" in msg


def test_unknown_kind(tmp_path):
    rec = mini_recipe(tmp_path)
    rec.write_text(rec.read_text().replace("kind: sft", "kind: sfft", 1))
    msg = _error([f"recipe={rec}"])
    assert "stages.sft.kind" in msg and "sfft" in msg and "did you mean 'sft'" in msg


def test_bad_type(tmp_path):
    assert "stages.sft.lr='fast' is not a float" in _error([f"recipe={mini_recipe(tmp_path)}", "stages.sft.lr=fast"])


def test_bad_choice():
    assert "stages.sft.schedule='cosin' is not one of" in _error(["recipe=tiny", "stages.sft.schedule=cosin"])


def test_unknown_group_option():
    msg = _error(["recipe=tiny", "deepspeed=zero9"])
    assert "zero9" in msg


def test_unknown_recipe():
    assert "recipe=tinyy: no such recipe" in _error(["recipe=tinyy"])


def test_missing_recipe_file(tmp_path):
    assert "file not found" in _error([f"recipe={tmp_path / 'nope.yaml'}"])


def test_malformed_yaml(tmp_path):
    rec = write_recipe(tmp_path, "name: x\nstages:\n  sft: {kind: sft\n")
    msg = _error([f"recipe={rec}"])
    assert "malformed YAML" in msg and "line" in msg


def test_from_names_missing_stage(tmp_path):
    msg = _error([f"recipe={mini_recipe(tmp_path)}", "stages.sft2.from=sfft"])
    assert "stages.sft2.from='sfft' names no stage" in msg


def test_from_names_later_stage(tmp_path):
    msg = _error([f"recipe={mini_recipe(tmp_path)}", "stages.sft.from=sft2"])
    assert "stages.sft.from: 'sft2' comes at or after 'sft'" in msg


def test_cycle(tmp_path):
    msg = _error([f"recipe={mini_recipe(tmp_path)}", "stages.sft.from=sft2", "stages.sft2.from=sft"])
    assert "cycle" in msg and "sft -> sft2 -> sft" in msg or "sft2 -> sft -> sft2" in msg


def test_self_reference_is_a_cycle(tmp_path):
    assert "cycle" in _error([f"recipe={mini_recipe(tmp_path)}", "stages.sft.from=sft"])


def test_non_dividing_batch_shows_arithmetic(tmp_path):
    msg = _error([f"recipe={mini_recipe(tmp_path)}", "stages.sft.global_batch_size=20",
                  "cluster.nproc_per_node=2"])
    assert "stages.sft.global_batch_size=20" in msg
    assert "micro_batch_size 8 x 2 rank(s) = 16" in msg and "multiple of 16" in msg


def test_empty_data_list(tmp_path):
    assert "stages.sft.data is empty" in _error([f"recipe={mini_recipe(tmp_path)}", "stages.sft.data=[]"])


def test_no_stages(tmp_path):
    rec = write_recipe(tmp_path, "defaults: [base, _self_]\nname: x\nstages: {}\n")
    assert "no stages" in _error([f"recipe={rec}"])


def test_unparseable_override():
    assert "cannot parse override" in _error(["recipe=tiny", "stages.sft.lr=[1,"])


@pytest.mark.parametrize("g,m,w,accum", [(64, 8, 1, 8), (64, 8, 2, 4), (64, 32, 2, 1), (12, 3, 2, 2)])
def test_batch_arithmetic(g, m, w, accum):
    b = batch_arithmetic("stages.s", {"global_batch_size": g, "micro_batch_size": m, "max_seq_len": 100}, w)
    assert b["grad_accum"] == accum
    assert b["global_batch_size"] == b["micro_batch_size"] * b["world_size"] * b["grad_accum"]
    assert b["max_tokens_per_step"] == g * 100


def test_batch_arithmetic_rejects_non_divisible():
    with pytest.raises(UserError, match=r"global_batch_size=10 does not divide.*4 x 2 rank\(s\) = 8") as e:
        batch_arithmetic("stages.s", {"global_batch_size": 10, "micro_batch_size": 4, "max_seq_len": 8}, 2)
    # The overrides that fit, in the same line: 10 / 2 ranks = 5 per rank.
    assert str(e.value).endswith("or stages.s.micro_batch_size=5 (or null: 10 / 2 rank(s))")


@pytest.mark.parametrize("world,micro", [(1, 128), (2, 64), (8, 16)])
def test_a_null_micro_batch_is_each_ranks_share(world, micro):
    b = batch_arithmetic("stages.s", {"global_batch_size": 128, "micro_batch_size": None, "max_seq_len": 8}, world)
    assert (b["micro_batch_size"], b["grad_accum"]) == (micro, 1)
    with pytest.raises(UserError, match=r"stages.s.global_batch_size=128 does not split over 3 rank\(s\); use a "
                                        r"multiple of 3, e.g. stages.s.global_batch_size=126"):
        batch_arithmetic("stages.s", {"global_batch_size": 128, "micro_batch_size": None, "max_seq_len": 8}, 3)


def test_rl_batches_name_the_prompts_per_step_that_fit():
    from posttrain_cli.kinds.batch import rl_batch

    stage = {"prompts_per_step": 8, "num_generations": 1, "mini_batches": 2, "micro_batch_size": None,
             "max_seq_len": 8}
    # 8 prompts x 1 / 2 mini-batches = 4 sequences per update: not 1 per rank on 8 ranks; 16 prompts are.
    with pytest.raises(UserError, match=r"4 per update do not split over 8 rank\(s\); use stages.ppo.prompts_per_step=16"):
        rl_batch("stages.ppo", stage, 8)
    assert rl_batch("stages.ppo", {**stage, "prompts_per_step": 16}, 8)["micro_batch_size"] == 1
    with pytest.raises(UserError, match=r"prompts_per_step=12 does not divide over 8 rank\(s\); use a multiple "
                                        r"of 8, e.g. stages.ppo.prompts_per_step=16"):
        rl_batch("stages.ppo", {**stage, "prompts_per_step": 12}, 8)


def test_unknown_verifier_is_a_config_error():
    msg = _error(["recipe=tiny", "stages.sft.eval.verifier=numbr"])
    assert "stages.sft.eval.verifier='numbr' is not a verifier" in msg and "did you mean 'number'" in msg
