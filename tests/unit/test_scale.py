"""scale=tiny (posttrain_cli/config/scale.py): what it swaps in and what it keeps."""

from __future__ import annotations

from posttrain_cli.config.compose import CONF_DIR, compose
from posttrain_cli.config.scale import DATA, to_tiny, tiny_stage


def test_path_sources_become_tiny_data_and_stage_outputs_stay():
    st = tiny_stage({"kind": "sft", "data": [{"from": "rs"}, {"path": "org/big", "weight": 0.2}], "epochs": 2,
                     "lr": 1e-5, "resources": {"nodes": 4}})
    assert st["data"] == [{"from": "rs"}, {"path": DATA + "sft_train.jsonl"}]
    assert st["max_steps"] == 10 and "epochs" not in st and "resources" not in st
    # The method's settings stay.
    assert st["lr"] == 1e-5
    # A required slot (???) and a list of only stage outputs.
    assert tiny_stage({"kind": "dpo", "data": "???"})["data"] == [{"path": DATA + "pref_train.jsonl"}]
    assert tiny_stage({"kind": "sft", "data": [{"from": "gen"}]})["data"] == [{"from": "gen"}]


def test_sizes_are_capped_not_raised():
    st = tiny_stage({"kind": "grpo", "num_generations": 16, "prompts_per_step": 512, "mini_batches": 4,
                     "max_new_tokens": 32768, "ref_refresh_every": 400, "overlong_buffer": 4096, "beta": 0.001})
    assert (st["num_generations"], st["prompts_per_step"], st["mini_batches"]) == (4, 8, 2)
    assert (st["max_new_tokens"], st["ref_refresh_every"], st["overlong_buffer"]) == (8, 2, 2)
    assert st["beta"] == 0.001 and st["verifiers"] == {"add": "number", "sub": "number"}
    # Defaults are capped too (grpo's num_generations 8 -> 4); a GRPO group keeps 2 samples.
    assert tiny_stage({"kind": "grpo"})["num_generations"] == 4
    assert tiny_stage({"kind": "grpo", "num_generations": 1})["num_generations"] == 2
    assert tiny_stage({"kind": "ppo", "num_generations": 1})["num_generations"] == 1


def test_verifiers_only_where_the_stage_scores_with_them():
    assert "verifiers" not in tiny_stage({"kind": "ppo", "reward_model": "rm"})
    assert "verifiers" not in tiny_stage({"kind": "rejection_sampling", "reward_model": "rm"})
    rs = tiny_stage({"kind": "rejection_sampling", "extra_verifiers": ["format"], "keep": "all_pass",
                     "max_per_prompt": 2, "num_samples": 16})
    assert rs["verifiers"] == {"add": "number", "sub": "number"} and rs["num_samples"] == 4
    # A few-step model passes nothing: all_pass keeps the best, and truncated answers stay.
    assert (rs["keep"], rs["max_per_prompt"], rs["threshold"], rs["drop_truncated"]) == ("best", None, None, False)


def test_teachers_take_the_tiny_domains_in_order():
    st = tiny_stage({"kind": "distill", "teachers": {"math": "t_math", "code": "t_code", "chat": "t_chat"},
                     "teacher_weights": {"math": 2, "code": 1}})
    assert st["teachers"] == {"add": "t_math", "sub": "t_code"}
    assert st["teacher_weights"] == {"add": 2, "sub": 1}
    assert tiny_stage({"kind": "distill", "teachers": {"math": "t"}})["teachers"] == {"add": "t", "sub": "t"}
    assert st["data"] == [{"path": DATA + "rl_train.jsonl"}, {"path": DATA + "sub_rl_train.jsonl"}]


def test_rounds_eval_blocks_and_the_recipes_tiny_block():
    cfg = {"name": "x", "model": {"path": "org/big"}, "deepspeed": {"zero_stage": 3, "offload_optimizer": True},
           "stages": {"round": {"kind": "rounds", "count": 6, "stages": {
               "dpo": {"kind": "dpo", "data": "???", "eval": {"data": "???", "reward_model": "rm"}}}}},
           "tiny": {"stages": {"round": {"count": 2}}}}
    out = to_tiny(cfg, CONF_DIR)
    assert out["model"]["path"] == "tiny" and out["deepspeed"] == {"zero_stage": 3, "offload_optimizer": False,
                                                                   "offload_param": False}
    dpo = out["stages"]["round"]["stages"]["dpo"]
    assert dpo["max_steps"] == 5 and dpo["eval"]["data"] == [{"path": DATA + "sft_eval.jsonl"}]
    assert dpo["eval"]["reward_model"] == "rm" and dpo["eval"]["limit"] == 32
    assert out["stages"]["round"]["count"] == 2 and "tiny" not in out


def test_shell_overrides_apply_after_the_scale():
    cfg, _ = compose(["recipe=tulu3", "scale=tiny", "stages.sft.max_steps=7", "stages.dpo.beta=3"])
    assert cfg["scale"] == "tiny" and cfg["model"]["path"] == "tiny"
    assert cfg["stages"]["sft"]["max_steps"] == 7 and cfg["stages"]["dpo"]["beta"] == 3
    # The published settings stay at tiny scale.
    assert cfg["stages"]["dpo"]["loss"] == "dpo_norm" and cfg["stages"]["rlvr"]["verifiable_reward"] == 10
    cfg, _ = compose(["recipe=tulu3"])
    assert cfg["scale"] == "full" and cfg["stages"]["sft"]["epochs"] == 2


def test_an_unknown_scale_is_refused():
    import pytest

    from posttrain_cli.errors import UserError

    with pytest.raises(UserError, match="scale=huge: choose one of full, tiny"):
        compose(["recipe=tiny", "scale=huge"])
