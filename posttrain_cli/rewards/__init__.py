"""Verifiers: pure functions (completion, ground_truth, row) -> float, registered by name."""

from __future__ import annotations

from typing import Callable

VERIFIERS: dict[str, Callable[[str, str, dict], float]] = {}


def register(name: str):
    def wrap(fn):
        if name in VERIFIERS:
            raise ValueError(f"verifier {name!r} registered twice")
        VERIFIERS[name] = fn
        return fn

    return wrap


from posttrain_cli.rewards import verifiers  # noqa: E402,F401  (registers)
