"""Which verifiers grade a prompt row: the stage's verifier keys, checked, and a row's dataset
resolved to verifier names.

A row's verifiers: `verifiers[row["dataset"]]` when mapped (exact, then case-insensitive);
else its dataset when that names a verifier or a known public dataset (gsm8k -> number,
MATH -> math, ifeval -> ifeval, ..., case-insensitive, an "org/" prefix dropped); else the
stage's `verifier`; then every one of `extra_verifiers` (R1: [format]), each name once.

Pure Python: config validation imports it at start-up.
"""

from __future__ import annotations

import difflib

from posttrain_cli.errors import UserError
from posttrain_cli.rewards import VERIFIERS, missing_dependency

# Datasets whose `dataset` value names the verifier that grades them (lower case, no "org/").
DATASET_ALIASES = {
    "gsm8k": "number", "gsm8k_ref": "number",
    "math": "math", "hendrycks_math": "math", "competition_math": "math", "math500": "math",
    "math-500": "math", "minerva_math": "math", "aime": "math", "amc": "math", "numinamath": "math",
    "ifeval": "ifeval", "rlvr-ifeval": "ifeval",
    "code": "code", "mbpp": "code", "humaneval": "code", "apps": "code", "taco": "code",
    "codecontests": "code", "code_contests": "code", "livecodebench": "code",
}


class Routes:
    """A stage's verifier keys, checked at construction; `for_row` resolves (and caches per
    dataset) the verifiers of one row. `suggest_reward_model`: the stage could score with its
    `reward_model` instead, so the no-verifier error says so."""

    def __init__(self, cfg: dict, where: str = "", *, suggest_reward_model: bool = False):
        self.where, self.suggest_reward_model = where, suggest_reward_model
        self.default, self.mapping, self.extra = verifier_keys(cfg, where)
        self._resolved: dict = {}

    def for_row(self, row: dict) -> tuple[str, ...]:
        """The verifiers that grade `row`, in order; UserError when none does."""
        dataset = row.get("dataset")
        key = dataset if isinstance(dataset, str) or dataset is None else str(dataset)
        if key not in self._resolved:
            self._resolved[key] = self._resolve(key, row)
        return self._resolved[key]

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
                raise UserError(f"{source(row)}: no verifier: the row has no 'dataset' field and "
                                f"{stage}verifier is not set; set it {known}")
            raise UserError(f"{source(row)}: no verifier for its 'dataset' field ({dataset!r}); set "
                            f"{stage}verifier, or map it: {stage}verifiers: {{{dataset}: <verifier>}} {known}")
        names = tuple(dict.fromkeys(base + self.extra))
        for name in names:
            problem = missing_dependency(name)
            if problem:
                raise UserError(f"{source(row)}: dataset={dataset!r} is graded by '{name}', but {problem}")
        return names


def verifier_keys(cfg: dict, where: str) -> tuple[str | None, dict[str, tuple[str, ...]], tuple[str, ...]]:
    """(verifier, verifiers, extra_verifiers) of a config, checked and normalised to tuples."""
    default = cfg.get("verifier")
    if default is not None:
        if not isinstance(default, str):
            raise UserError(f"{key(where, 'verifier')}={default!r} must be a verifier name")
        check_known(key(where, "verifier"), default)
    mapping = cfg.get("verifiers") or {}
    if not isinstance(mapping, dict):
        raise UserError(f"{key(where, 'verifiers')} must map a row's dataset to a verifier name or list of names")
    normal = {}
    for dataset, names in mapping.items():
        path = key(where, f"verifiers.{dataset}")
        normal[str(dataset)] = _name_list(path, names)
        if not normal[str(dataset)]:
            raise UserError(f"{path} is empty: name at least one verifier")
    extra = _name_list(key(where, "extra_verifiers"), cfg.get("extra_verifiers") or [])
    return default, normal, extra


def check_known(path: str, name: str) -> None:
    """UserError unless `name` is a registered verifier whose dependencies are installed."""
    if name not in VERIFIERS:
        close = difflib.get_close_matches(name, list(VERIFIERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{path}: '{name}' is not a verifier (known: {', '.join(sorted(VERIFIERS))}){hint}")
    problem = missing_dependency(name)
    if problem:
        raise UserError(f"{path}: {problem}")


def key(where: str, name: str) -> str:
    """The dotted config key `name` of the stage at `where` ("stages.grpo"; "" for a bare config)."""
    return f"{where}.{name}" if where else name


def source(row: dict) -> str:
    """Where a row came from, for messages ("q.jsonl: row 3")."""
    return str(row.get("src") or "a prompt row")


def _name_list(path: str, names) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}={names!r} must be a verifier name or a list of names")
    for i, name in enumerate(names):
        check_known(path if len(names) == 1 else f"{path}[{i}]", name)
    return tuple(names)
