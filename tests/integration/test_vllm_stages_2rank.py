"""test_vllm_stages.py's run on 2 ranks under ZeRO-3 (each rank its own vLLM engine, loaded with the
gathered weights after every update): the same checks as the 1-rank run. A file of its own so the
two test workers run the two set-ups at once."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/vllm_env.sh makes an environment with it)")

from tests.integration.test_vllm_stages import (check_every_sampling_kind_completes,  # noqa: E402
                                                check_sampled_datasets_are_sft_rows, check_the_engine_takes_every_update,
                                                run_setup)

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.vllm]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_setup(tmp_path_factory, "2rank_zero3")


def test_every_sampling_kind_completes_on_vllm(run_dir):
    check_every_sampling_kind_completes(run_dir)


def test_the_engine_takes_every_update_and_samples_what_the_trainer_would(run_dir):
    check_the_engine_takes_every_update(run_dir)


def test_sampled_datasets_are_sft_rows(run_dir):
    check_sampled_datasets_are_sft_rows(run_dir)
