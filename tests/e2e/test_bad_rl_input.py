"""Bad RL input through the CLI: one line naming the key, file, row or field, exit 2, and the
SFT stage before it never starts."""

from __future__ import annotations

import pytest

from tests.conftest import mini_recipe, posttrain, sft_stage, tiny_rows, with_bad_rows
from tests.e2e.test_bad_input import _check


def _rl_recipe(tmp, rows, extra: str = ""):
    data = with_bad_rows(tmp / "rl.jsonl", tiny_rows("rl_train.jsonl", 8), 4, rows)
    return mini_recipe(tmp, stages=[sft_stage(data=tmp / "train.jsonl", max_steps=2, global_batch_size=8), f"""
      grpo:
        kind: grpo
        data: [{{path: {data}}}]
        prompts_per_step: 4
        num_generations: 2
        micro_batch_size: 4
        max_steps: 1
        {extra}
    """])


def test_a_dataset_without_a_verifier(tmp_path):
    rec = _rl_recipe(tmp_path, [])
    _check(posttrain("run", f"recipe={rec}", cwd=tmp_path), "rl.jsonl: row 1", "'dataset'", "'add'",
           "stages.grpo.verifier", run_dir=tmp_path / "runs" / "mini")


def test_a_row_without_ground_truth(tmp_path):
    rec = _rl_recipe(tmp_path, [{"messages": [{"role": "user", "content": "1+1"}], "dataset": "add"}],
                     extra="verifier: number")
    _check(posttrain("run", f"recipe={rec}", cwd=tmp_path), "rl.jsonl: row 4", "ground_truth",
           run_dir=tmp_path / "runs" / "mini")


@pytest.mark.parametrize("override, needles", [
    ("stages.grpo.verifier=numbr", ("stages.grpo.verifier", "did you mean 'number'")),
    ("stages.grpo.adv_norm=whiten", ("stages.grpo.adv_norm",)),
    ("stages.grpo.num_generations=1", ("stages.grpo.num_generations=1", "at least 2")),
    ("stages.grpo.prompts_per_step=3", ("do not divide", "micro_batch_size")),
])
def test_bad_rl_settings(tmp_path, override, needles):
    rec = _rl_recipe(tmp_path, [], extra="verifier: number")
    _check(posttrain("run", f"recipe={rec}", override, cwd=tmp_path), *needles, run_dir=tmp_path / "runs" / "mini")
