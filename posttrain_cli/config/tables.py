"""Checking a keyed table against its spec: defaults filled, types coerced, unknown keys named.

    check_table("stages.sft", given, KINDS["sft"].schema)    # -> the table with every default

Every failure is a UserError whose one line names the key (`stages.sft.lr`) and says what
would be accepted.
"""

from __future__ import annotations

import difflib
from typing import Any

from posttrain_cli.config import schema
from posttrain_cli.errors import UserError
from posttrain_cli.kinds.base import EVAL, REQUIRED


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"


def _coerce(path: str, value: Any, typ) -> Any:
    if isinstance(typ, tuple):
        if value in typ:
            return value
        choices = ", ".join(str(c) for c in typ)
        raise UserError(f"{path}={value!r} is not one of: {choices}")
    optional = typ.startswith("?")
    base = typ.lstrip("?")
    if value is None:
        if optional:
            return None
        raise UserError(f"{path} must be set (a {base})")
    if base == "any":
        return value
    if base == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "list":
        if isinstance(value, (list, tuple)):
            return list(value)
    elif base == "dict":
        if isinstance(value, dict):
            return dict(value)
    elif base == "eval":
        return check_table(path, value, EVAL)
    elif base == "resources":
        return check_table(path, value, schema.RESOURCES)
    else:  # pragma: no cover - a schema typo, not user input
        raise AssertionError(f"unknown schema type {typ}")
    raise UserError(f"{path}={value!r} is not a {base}")


def check_table(path: str, given: Any, spec: dict) -> dict:
    if not isinstance(given, dict):
        raise UserError(f"{path} must be a mapping of keys, got {given!r}")
    out = {}
    for key in given:
        if key not in spec:
            raise UserError(f"unknown key '{path}.{key}'{_suggest(key, spec)}")
    for key, (typ, default) in spec.items():
        if key in given:
            out[key] = _coerce(f"{path}.{key}", given[key], typ)
        elif default is REQUIRED:
            raise UserError(f"{path}.{key} is required")
        else:
            out[key] = default.copy() if isinstance(default, (list, dict)) else default
    return out


def partial(spec: dict) -> dict:
    """`spec` with every key optional and unset by default (a per-stage override of a section)."""
    return {k: ("?any" if not isinstance(t, tuple) else t + (None,), None) for k, (t, _) in spec.items()}


def check_sources(path: str, sources: list) -> list:
    out = []
    for i, src in enumerate(sources):
        if isinstance(src, str):
            src = {"path": src}
        src = check_table(f"{path}[{i}]", src, schema.SOURCE)
        if (src["path"] is None) == (src["from"] is None):
            raise UserError(f"{path}[{i}] needs exactly one of 'path' or 'from'")
        if src["weight"] <= 0:
            raise UserError(f"{path}[{i}].weight={src['weight']} must be > 0")
        out.append(src)
    return out
