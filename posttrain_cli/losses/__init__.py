"""Losses: pure functions on tensors, registered by name.

A stage looks a loss up by name (`LOSSES[cfg.loss]`); adding one is a
function and a decorator, never a branch in a trainer.
"""

from __future__ import annotations

from typing import Callable

LOSSES: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = fn
        return fn

    return wrap


from posttrain_cli.losses import sft  # noqa: E402,F401  (registers)
