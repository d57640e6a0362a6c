"""Rewards for RL stages: which verifiers grade a prompt row, their weighted sum, and timeouts.

    check_config(stage_cfg, "stages.grpo")           # at config time: names, weights, deps
    rewards = Rewards(stage_cfg, warn=print, where="stages.grpo")
    rewards.check_rows(rows)                          # every row resolves to a verifier
    total, per_verifier = rewards.score(completions, rows)

A row's verifiers: `verifiers[row["dataset"]]` when mapped; else its dataset when that names a
verifier or a known public dataset (gsm8k -> number, MATH -> math, ifeval -> ifeval, ...,
case-insensitive, an "org/" prefix dropped); else the stage's `verifier`; then every one of
`extra_verifiers` (R1: [format]). Reward = sum of weight x score, weights from `reward_weights`
(default 1).

A verifier that raises or overruns `verifier_timeout` scores 0, is counted in `failures` (and
`timeouts`), and is reported through `warn` for its first few failures, then once more with a
note that the rest are only counted; it never stops the run. Timeouts: on the main thread a
SIGALRM timer (signal.setitimer; an earlier timer is restored afterwards); off the main thread a
watchdog raises the timeout in the scoring thread (PyThreadState_SetAsyncExc). Both interrupt
Python code between bytecodes: a single long C call (one huge integer power) is interrupted only
when it returns. Slow one-off set-up (math: importing sympy) runs untimed before the first call.
`code` runs its own sandboxed processes, concurrently, and `verifier_timeout` is
each sandbox's wall-clock limit; code that runs out of time is a wrong answer (0), not a failure.
"""

from __future__ import annotations

import difflib
import logging
import math
import signal
import threading
from collections import Counter
from typing import Callable

from posttrain_cli.errors import UserError
from posttrain_cli.rewards import BATCH, NEEDS_GROUND_TRUTH, SETUP, VERIFIERS, missing_dependency

# Datasets whose `dataset` value names the verifier that grades them (lower case, no "org/").
DATASET_ALIASES = {
    "gsm8k": "number", "gsm8k_ref": "number",
    "math": "math", "hendrycks_math": "math", "competition_math": "math", "math500": "math",
    "math-500": "math", "minerva_math": "math", "aime": "math", "amc": "math", "numinamath": "math",
    "ifeval": "ifeval", "rlvr-ifeval": "ifeval",
    "code": "code", "mbpp": "code", "humaneval": "code", "apps": "code", "taco": "code",
    "codecontests": "code", "code_contests": "code", "livecodebench": "code",
}
WARN_FIRST = 3  # failures reported one by one per verifier; later ones are only counted


class VerifierTimeout(BaseException):
    """Raised inside a verifier that overran. A BaseException so that `except Exception` in the
    verifier (math-verify has several) does not swallow it."""


def uses_verifiers(cfg: dict) -> bool:
    """Whether a stage scores with verifiers: grpo always (a row's dataset may name one); ppo and
    rejection_sampling when a verifier key is set or they have no reward model; distill when its
    outcome advantage is on (alpha > 0)."""
    kind = cfg.get("kind")
    if kind == "grpo":
        return True
    if kind == "distill":
        return cfg.get("alpha", 0) > 0
    if kind == "rejection_sampling" and cfg.get("reward_model") is None:
        return True
    return bool(cfg.get("verifier") or cfg.get("verifiers") or cfg.get("extra_verifiers"))


def check_config(cfg: dict, where: str) -> None:
    """UserError for a bad verifier set-up in an RL stage's config (`where`: "stages.grpo")."""
    _names(cfg, where)
    timeout = cfg.get("verifier_timeout", 10.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise UserError(f"{_key(where, 'verifier_timeout')}={timeout!r} must be a number of seconds > 0")
    weights = cfg.get("reward_weights") or {}
    if not isinstance(weights, dict):
        raise UserError(f"{_key(where, 'reward_weights')} must map verifier names to weights")
    for name, w in weights.items():
        _known(_key(where, f"reward_weights.{name}"), name)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise UserError(f"{_key(where, f'reward_weights.{name}')}={w!r} must be a finite number")


class Rewards:
    def __init__(self, cfg: dict, warn: Callable[[str], None] | None = None, where: str = "",
                 max_workers: int | None = None, *, suggest_reward_model: bool = False):
        """`warn(msg)` gets one-line warnings (default: logging). `max_workers` bounds the
        concurrent code sandboxes (default: CPU count, at most 8). `suggest_reward_model`: the
        stage could score with `reward_model` instead, so a row without a verifier says so."""
        check_config(cfg, where)
        self.where, self.suggest_reward_model = where, suggest_reward_model
        self.default, self.mapping, self.extra = _names(cfg, where)
        self.weights = {name: float(w) for name, w in (cfg.get("reward_weights") or {}).items()}
        self.timeout = float(cfg.get("verifier_timeout", 10.0))
        self.max_workers = max_workers
        self.warn = warn or logging.getLogger(__name__).warning
        self.calls: Counter = Counter()  # verifier -> completions graded
        self.failures: Counter = Counter()  # verifier -> calls that raised or timed out (scored 0)
        self.timeouts: Counter = Counter()  # verifier -> the timed-out part of failures
        self._resolved: dict = {}
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
        dataset = row.get("dataset")
        key = dataset if isinstance(dataset, str) or dataset is None else str(dataset)
        if key not in self._resolved:
            self._resolved[key] = self._resolve(key, row)
        return self._resolved[key]

    def names(self, rows: list[dict]) -> list[str]:
        """Every verifier some row uses, sorted (for per-verifier metrics)."""
        return sorted({name for row in rows for name in self.verifiers_for(row)})

    def check_rows(self, rows: list[dict]) -> None:
        """Pre-flight: every row resolves to installed verifiers and has the fields they read."""
        for row in rows:
            names = self.verifiers_for(row)
            needs = [n for n in names if n in NEEDS_GROUND_TRUTH]
            if needs and row.get("ground_truth") is None:
                raise UserError(f"{_src(row)}: no 'ground_truth' field, which verifier '{needs[0]}' "
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

    def _resolve(self, dataset: str | None, row: dict) -> tuple[str, ...]:
        base: tuple[str, ...] = ()
        if dataset is not None:
            lowered = {str(k).lower(): v for k, v in self.mapping.items()}
            if dataset in self.mapping:
                base = self.mapping[dataset]
            elif dataset.lower() in lowered:
                base = lowered[dataset.lower()]
            else:
                short = dataset.lower().rsplit("/", 1)[-1]
                alias = short if short in VERIFIERS else DATASET_ALIASES.get(short)
                base = (alias,) if alias in VERIFIERS else ()
        if not base and self.default:
            base = (self.default,)
        if not base:
            stage = f"{self.where}." if self.where else ""
            known = f"(verifiers: {', '.join(sorted(VERIFIERS))})"
            if self.suggest_reward_model:
                known += f", or score with a reward model: {stage}reward_model"
            if dataset is None:
                raise UserError(f"{_src(row)}: no verifier: the row has no 'dataset' field and "
                                f"{stage}verifier is not set; set it {known}")
            raise UserError(f"{_src(row)}: no verifier for its 'dataset' field ({dataset!r}); set "
                            f"{stage}verifier, or map it: {stage}verifiers: {{{dataset}: <verifier>}} {known}")
        names = tuple(dict.fromkeys(base + self.extra))
        for name in names:
            problem = missing_dependency(name)
            if problem:
                raise UserError(f"{_src(row)}: dataset={dataset!r} is graded by '{name}', but {problem}")
        return names

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
        deadline = _Deadline(self.timeout)
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
            self.warn(f"verifier '{name}' failed on {_src(row)}, scored 0: {why.splitlines()[0][:200]}{more}")
        return 0.0


def _names(cfg: dict, where: str) -> tuple[str | None, dict[str, tuple[str, ...]], tuple[str, ...]]:
    """(verifier, verifiers, extra_verifiers) of a config, checked and normalised to tuples."""
    default = cfg.get("verifier")
    if default is not None:
        if not isinstance(default, str):
            raise UserError(f"{_key(where, 'verifier')}={default!r} must be a verifier name")
        _known(_key(where, "verifier"), default)
    mapping = cfg.get("verifiers") or {}
    if not isinstance(mapping, dict):
        raise UserError(f"{_key(where, 'verifiers')} must map a row's dataset to a verifier name or list of names")
    normal = {}
    for dataset, names in mapping.items():
        path = _key(where, f"verifiers.{dataset}")
        normal[str(dataset)] = _list(path, names)
        if not normal[str(dataset)]:
            raise UserError(f"{path} is empty: name at least one verifier")
    extra = _list(_key(where, "extra_verifiers"), cfg.get("extra_verifiers") or [])
    return default, normal, extra


def _list(path: str, names) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}={names!r} must be a verifier name or a list of names")
    for i, name in enumerate(names):
        _known(path if len(names) == 1 else f"{path}[{i}]", name)
    return tuple(names)


def _known(path: str, name: str) -> None:
    if name not in VERIFIERS:
        close = difflib.get_close_matches(name, list(VERIFIERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{path}: '{name}' is not a verifier (known: {', '.join(sorted(VERIFIERS))}){hint}")
    problem = missing_dependency(name)
    if problem:
        raise UserError(f"{path}: {problem}")


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _src(row: dict) -> str:
    return str(row.get("src") or "a prompt row")


def _as_score(value) -> float:
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"returned {value!r}")
    return score


class _Deadline:
    """Raises VerifierTimeout in the calling thread `seconds` after start() unless stop() came
    first (see the module docstring). stop() may be called again after a VerifierTimeout that
    interrupted it; the timer is one-shot, so the second call completes."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.on_main = threading.current_thread() is threading.main_thread()
        self.stopped, self.disarmed, self.left = True, False, 0.0  # start() arms it

    def start(self) -> None:
        self.stopped = False
        if self.on_main:
            self.old_handler = signal.signal(signal.SIGALRM, _on_alarm)
            self.old_timer = signal.setitimer(signal.ITIMER_REAL, self.seconds)
        else:
            self.lock, self.fired, self.done = threading.Lock(), False, False
            self.thread_id = threading.get_ident()
            self.watchdog = threading.Timer(self.seconds, self._fire)
            self.watchdog.daemon = True
            self.watchdog.start()

    def _fire(self) -> None:
        with self.lock:
            if not self.done:
                self.fired = True
                _async_raise(self.thread_id, VerifierTimeout)

    def stop(self) -> None:
        if self.stopped:
            return
        if self.on_main:
            if not self.disarmed:
                self.left = signal.setitimer(signal.ITIMER_REAL, 0)[0]
                self.disarmed = True
            signal.signal(signal.SIGALRM, self.old_handler)
            outer, interval = self.old_timer
            if outer:  # someone else's timer was running: re-arm it with what it has left
                signal.setitimer(signal.ITIMER_REAL, max(outer - (self.seconds - self.left), 1e-3), interval)
        else:
            self.watchdog.cancel()
            with self.lock:
                self.done = True
                if self.fired:  # raised but maybe not delivered yet: drop it rather than later
                    _async_raise(self.thread_id, None)
        self.stopped = True


def _on_alarm(signum, frame):
    raise VerifierTimeout()


def _async_raise(thread_id: int, exc) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)
