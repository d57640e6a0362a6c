"""Losses: pure functions on tensors, registered by name.

A stage looks a loss up by name (`PREFERENCE_LOSSES[cfg["loss"]]`, `POLICY_LOSSES["clip"]`);
adding one is a function and a decorator, never a branch in a trainer. One table per
signature, every function in a table called the same way:

- `LOSSES` (losses/sft.py): token cross-entropy, (logits, targets) -> (sum, count);
- `PREFERENCE_LOSSES` (losses/preference.py): pairwise, (PairLogps, PrefOptions) -> per pair
  (loss, chosen reward, rejected reward);
- the on-policy tables of losses/rl.py: `ADVANTAGES` (group rewards -> advantages),
  `KL_ESTIMATORS` (logp, ref_logp -> per-token KL), `LOSS_AGGREGATIONS` (token loss -> (sum,
  weight)) and `POLICY_LOSSES` ((logp, old_logp, advantages, cfg) -> (token loss, metrics));
- `DISTILL_LOSSES` (losses/distill.py): the student's per-token reverse KL to its teachers.
"""

from __future__ import annotations

from typing import Callable

LOSSES: dict[str, Callable] = {}
PREFERENCE_LOSSES: dict[str, Callable] = {}
ADVANTAGES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
LOSS_AGGREGATIONS: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}


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
