"""Row schemas (the public datasets' own), checked row by row in pure Python.

An error names the file, the 1-based row number and the field.
"""

from __future__ import annotations

from posttrain_cli.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def _where(src: str, row: int) -> str:
    return f"{src}: row {row}"


def check_messages(msgs, where: str, field: str = "messages") -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UserError(f"{where}: field '{field}[{i}]' must be a {{role, content}} mapping")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: field '{field}[{i}].role'={role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where}: field '{field}[{i}].content' must be a string")
        out.append({"role": role, "content": content})
    return out


def sft_messages(row, src: str, n: int) -> list[dict]:
    """An SFT row: `messages` with at least one assistant turn, or `prompt` + `completion`."""
    where = _where(src, n)
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object")
    if "messages" in row:
        msgs = check_messages(row["messages"], where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: field 'messages' has no assistant turn to train on")
        return msgs
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise UserError(f"{where}: field '{key}' missing or not a string")
        return [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]}]
    raise UserError(f"{where}: field 'messages' missing (SFT rows need 'messages' or 'prompt' + 'completion')")


def prompt_row(row, src: str, n: int) -> dict:
    """A prompt row (eval, RL): `messages` (the prompt turns) or `prompt`, plus `ground_truth`."""
    where = _where(src, n)
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object")
    if "messages" in row:
        msgs = check_messages(row["messages"], where)
        if msgs[-1]["role"] == "assistant":
            # An SFT-style row: the prompt is everything before the last answer.
            msgs = msgs[:-1]
            if not msgs:
                raise UserError(f"{where}: field 'messages' holds only an assistant turn, no prompt")
    elif isinstance(row.get("prompt"), str):
        msgs = [{"role": "user", "content": row["prompt"]}]
    else:
        raise UserError(f"{where}: field 'messages' missing (prompt rows need 'messages' or 'prompt')")
    gt = row.get("ground_truth")
    if gt is None:
        raise UserError(f"{where}: field 'ground_truth' missing")
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        gt = str(gt)
    if not isinstance(gt, (str, list)):
        raise UserError(f"{where}: field 'ground_truth' must be a string")
    return {"messages": msgs, "ground_truth": gt, "dataset": row.get("dataset") or row.get("domain")}


ROW_SCHEMAS = {"sft": sft_messages, "prompt": prompt_row}
