"""Which teacher scores a prompt (distill): by the row's `dataset` (or `domain`) field.

    teacher_key(row, ["math", "code"], "stages.student")   # -> "math", or a UserError naming the row

Torch-free, so the runner checks every row before anything trains.
"""

from __future__ import annotations

from posttrain_cli.errors import UserError


def teacher_key(row: dict, teachers, where: str) -> str:
    """The key of `teachers` that row["dataset"] (set from `dataset` or `domain`) names."""
    value = row.get("dataset")
    if value in teachers:
        return value
    known = ", ".join(sorted(teachers))
    if value is None:
        raise UserError(f"{row.get('src', where)}: no 'dataset' (or 'domain') field to route the prompt to a "
                        f"teacher ({where}.teachers: {known})")
    raise UserError(f"{row.get('src', where)}: dataset {value!r} has no teacher in {where}.teachers "
                    f"(known: {known})")


def check_routes(rows: list[dict], teachers, where: str) -> dict[str, int]:
    """Every row routes to a teacher; -> prompts per teacher."""
    counts = {k: 0 for k in teachers}
    for row in rows:
        counts[teacher_key(row, teachers, where)] += 1
    return counts
