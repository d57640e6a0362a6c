"""The README's two set-up commands are the ones CI and users run."""

from __future__ import annotations

from tests.conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme
    # The whole suite in the main environment, then the vLLM tests in vLLM's (scripts/vllm_env.sh), then
    # Liger's there too (it has Triton; its interpreter runs the kernels without a GPU).
    assert ci.endswith("&& python -m pytest && scripts/vllm_env.sh python -m pytest -m vllm"
                       " && TRITON_INTERPRET=1 scripts/vllm_env.sh python -m pytest -m liger")


def test_readme_main_job_runs_the_tiny_recipe():
    readme = (REPO / "README.md").read_text()
    assert "pip install -e . && posttrain run recipe=tiny" in readme
