"""Fixtures shared by the code-sandbox tests (test_sandbox.py, test_sandbox_adversarial.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def mode() -> str:
    """The isolation this machine gives the code sandbox (rewards/sandbox.py isolation())."""
    from posttrain_cli.rewards import sandbox

    return sandbox.isolation().mode


@pytest.fixture
def namespaces(mode):
    if mode != "namespaces":
        pytest.skip(f"needs network/pid/mount namespaces; this machine runs the sandbox in {mode} mode")
