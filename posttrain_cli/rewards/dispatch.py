"""Rewards for RL stages: the weighted sum of a row's verifier scores, failures counted.

    check_config(stage_cfg, "stages.grpo")           # at config time: names, weights, deps
    rewards = Rewards(stage_cfg, warn=print, where="stages.grpo")
    rewards.check_rows(rows)                          # every row resolves to a verifier
    total, per_verifier = rewards.score(completions, rows)

Which verifiers grade a row is rewards/routing.py's job; the time limit on one call is
rewards/deadline.py's. Reward = sum of weight x score, weights from `reward_weights` (default 1).

A verifier that raises or overruns `verifier_timeout` scores 0, is counted in `failures` (and
`timeouts`), and is reported through `warn` for its first few failures, then once more with a
note that the rest are only counted; it never stops the run. Slow one-off set-up (math:
importing sympy) runs untimed before the first call. `code` runs its own sandboxed processes,
concurrently, and `verifier_timeout` is each sandbox's wall-clock limit; code that runs out of
time is a wrong answer (0), not a failure.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Callable

from posttrain_cli.errors import UserError
from posttrain_cli.rewards import BATCH, NEEDS_GROUND_TRUTH, SETUP, VERIFIERS
from posttrain_cli.rewards.deadline import Deadline, VerifierTimeout
from posttrain_cli.rewards.routing import Routes, check_known, key, source, verifier_keys

WARN_FIRST = 3  # failures reported one by one per verifier; later ones are only counted


def check_config(cfg: dict, where: str) -> None:
    """UserError for a bad verifier set-up in an RL stage's config (`where`: "stages.grpo")."""
    verifier_keys(cfg, where)
    timeout = cfg.get("verifier_timeout", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise UserError(f"{key(where, 'verifier_timeout')}={timeout!r} must be a number of seconds > 0")
    weights = cfg.get("reward_weights") or {}
    if not isinstance(weights, dict):
        raise UserError(f"{key(where, 'reward_weights')} must map verifier names to weights")
    for name, w in weights.items():
        check_known(key(where, f"reward_weights.{name}"), name)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise UserError(f"{key(where, f'reward_weights.{name}')}={w!r} must be a finite number")


class Rewards:
    def __init__(self, cfg: dict, warn: Callable[[str], None] | None = None, where: str = "",
                 max_workers: int | None = None, *, suggest_reward_model: bool = False):
        """`warn(msg)` gets one-line warnings (default: logging). `max_workers` bounds the
        concurrent code sandboxes (default: CPU count, at most 8). `suggest_reward_model`: the
        stage could score with `reward_model` instead, so a row without a verifier says so."""
        check_config(cfg, where)
        self.routes = Routes(cfg, where, suggest_reward_model=suggest_reward_model)
        self.weights = {name: float(w) for name, w in (cfg.get("reward_weights") or {}).items()}
        self.timeout = float(cfg.get("verifier_timeout", 10.0))
        self.max_workers = max_workers
        self.warn = warn or logging.getLogger(__name__).warning
        self.calls: Counter = Counter()  # verifier -> completions graded
        self.failures: Counter = Counter()  # verifier -> calls that raised or timed out (scored 0)
        self.timeouts: Counter = Counter()  # verifier -> the timed-out part of failures
        self._ready: set[str] = set()

    def counts(self) -> dict:
        """The call and failure counters (a mid-stage checkpoint keeps them)."""
        return {"calls": dict(self.calls), "failures": dict(self.failures), "timeouts": dict(self.timeouts)}

    def set_counts(self, counts: dict) -> None:
        for name in ("calls", "failures", "timeouts"):
            getattr(self, name).clear()
            getattr(self, name).update(counts.get(name, {}))

    def verifiers_for(self, row: dict) -> tuple[str, ...]:
        """The verifiers that grade `row`, in order; UserError when none does."""
        return self.routes.for_row(row)

    def names(self, rows: list[dict]) -> list[str]:
        """Every verifier some row uses, sorted (for per-verifier metrics)."""
        return sorted({name for row in rows for name in self.verifiers_for(row)})

    def check_rows(self, rows: list[dict]) -> None:
        """Pre-flight: every row resolves to installed verifiers and has the fields they read."""
        for row in rows:
            names = self.verifiers_for(row)
            needs = [n for n in names if n in NEEDS_GROUND_TRUTH]
            if needs and row.get("ground_truth") is None:
                raise UserError(f"{source(row)}: no 'ground_truth' field, which verifier '{needs[0]}' "
                                f"(dataset={row.get('dataset')!r}) needs")
        for name in self.names(rows):
            self._prepare(name)

    def score(self, completions: list[str], rows: list[dict]) -> tuple[list[float], list[dict[str, float]]]:
        """Weighted reward per completion, and each completion's raw score per verifier."""
        if len(completions) != len(rows):
            raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
        per: list[dict[str, float]] = [{} for _ in completions]
        todo: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            for name in self.verifiers_for(row):
                todo.setdefault(name, []).append(i)
        for name, items in todo.items():
            self.calls[name] += len(items)
            self._prepare(name)
            if name in BATCH:
                got = self._batch(name, [completions[i] for i in items], [rows[i] for i in items])
            else:
                got = [self._call(name, completions[i], rows[i]) for i in items]
            for i, s in zip(items, got):
                per[i][name] = s
        total = [sum(self.weights.get(n, 1.0) * s for n, s in p.items()) for p in per]
        return total, per

    def summary(self) -> str | None:
        """One line on failures so far, or None when there were none."""
        if not self.failures:
            return None
        parts = [f"{n}: {c}/{self.calls[n]}" + (f" ({self.timeouts[n]} timed out)" if self.timeouts[n] else "")
                 for n, c in sorted(self.failures.items())]
        return "verifier failures (scored 0): " + ", ".join(parts)

    # -- internals --

    def _prepare(self, name: str) -> None:
        """Once per verifier, untimed: its set-up (math: imports), and for code the sandbox's
        self-test, warning when it runs with less isolation than namespaces."""
        if name in self._ready:
            return
        self._ready.add(name)
        try:
            if name in SETUP:
                SETUP[name]()
            if name == "code":
                from posttrain_cli.rewards import sandbox

                note = sandbox.isolation().note
                if note:
                    self.warn(note)
        except Exception as e:  # noqa: BLE001  (its calls will fail and be counted)
            self.warn(f"verifier '{name}': set-up failed: {type(e).__name__}: {e}")

    def _call(self, name: str, completion: str, row: dict) -> float:
        deadline = Deadline(self.timeout)
        try:
            try:
                deadline.start()
                value = VERIFIERS[name](completion, row.get("ground_truth"), row)
            finally:
                deadline.stop()
            return _as_score(value)
        except VerifierTimeout:
            deadline.stop()  # it may have landed inside stop() itself
            return self._failed(name, row, f"timed out after {self.timeout:g}s", timed_out=True)
        except Exception as e:  # noqa: BLE001  (a verifier bug must not stop training)
            return self._failed(name, row, f"{type(e).__name__}: {e}")

    def _batch(self, name: str, completions: list[str], rows: list[dict]) -> list[float]:
        try:
            got = BATCH[name](completions, [r.get("ground_truth") for r in rows], rows,
                              timeout=self.timeout, max_workers=self.max_workers)
        except Exception as e:  # noqa: BLE001
            got = [e] * len(rows)
        out = []
        for value, row in zip(got, rows):
            try:
                if isinstance(value, BaseException):
                    raise value
                out.append(_as_score(value))
            except Exception as e:  # noqa: BLE001
                out.append(self._failed(name, row, f"{type(e).__name__}: {e}"))
        return out

    def _failed(self, name: str, row: dict, why: str, timed_out: bool = False) -> float:
        self.failures[name] += 1
        if timed_out:
            self.timeouts[name] += 1
        n = self.failures[name]
        if n <= WARN_FIRST:
            more = (f"; further '{name}' failures are only counted (Rewards.failures)"
                    if n == WARN_FIRST else "")
            self.warn(f"verifier '{name}' failed on {source(row)}, scored 0: {why.splitlines()[0][:200]}{more}")
        return 0.0


def _as_score(value) -> float:
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"returned {value!r}")
    return score
