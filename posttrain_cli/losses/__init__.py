"""Losses: pure functions on tensors, registered by name.

A stage looks a loss up by name (`PREFERENCE_LOSSES[cfg.loss]`); adding one is
a function and a decorator, never a branch in a trainer. Two tables, because
the signatures differ: token losses (`LOSSES`: logits, targets), pairwise
preference losses (`PREFERENCE_LOSSES`: per-sequence log-probs, options), and the
RL tables of losses/rl.py (`ADVANTAGES`, `KL_ESTIMATORS`, `LOSS_AGGREGATIONS`).
"""

from __future__ import annotations

from typing import Callable

LOSSES: dict[str, Callable] = {}
PREFERENCE_LOSSES: dict[str, Callable] = {}
ADVANTAGES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
LOSS_AGGREGATIONS: dict[str, Callable] = {}


def _registrar(table: dict, what: str):
    def register(name: str, **attrs):
        def wrap(fn: Callable) -> Callable:
            if name in table:
                raise ValueError(f"{what} {name!r} registered twice")
            for k, v in attrs.items():
                setattr(fn, k, v)
            table[name] = fn
            return fn

        return wrap

    return register


register = _registrar(LOSSES, "loss")
register_preference = _registrar(PREFERENCE_LOSSES, "preference loss")

from posttrain_cli.losses import distill, preference, rl, sft  # noqa: E402,F401  (registers)
