"""Row schemas (the public datasets' own), checked row by row in pure Python.

An error names the file, the 1-based row number and the field.

Rows load as the public datasets ship them, extra fields and all:
- extra row fields (`id`, `source`, `chosen_rating`, `constraint_type`, ...) are ignored here
  (prompt rows keep them for the verifiers); a null field counts as absent (Arrow files fill
  absent fields with null);
- a message keeps its extra keys (`tool_calls`, `name`, `tool_call_id`, `reasoning_content`, ...)
  so the chat template can render them; only role and content are checked, strictly;
- an assistant message that only calls tools may have `content: null` (read as "");
- content given as a list of parts ([{type: text, text}]) is the concatenation of its text parts
  (what multi-modal chat templates render for text parts);
- images are refused: an image part in a content list, or a non-empty `images` field, is an error
  naming the file, row and field. Every stage here trains or samples a text-only model; dropping the
  images silently would train on text that talks about a picture the model never sees. Filter such
  rows out of the data (an `images` field that is null or [] is fine).
"""

from __future__ import annotations

from posttrain_cli.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def _where(src: str, row: int) -> str:
    return f"{src}: row {row}"


def _present(row, where: str) -> dict:
    """The row's fields that are not null; refuses a non-mapping row and a row that carries images."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object")
    row = {k: v for k, v in row.items() if v is not None}
    images = row.get("images")
    if isinstance(images, list) and images:
        raise UserError(f"{where}: field 'images' holds {len(images)} image(s); posttrain trains text-only "
                        f"models (remove rows with images from the data)")
    return row


def _text(content: list, where: str, field: str) -> str:
    """A content list of parts -> its text parts joined; any other part is refused."""
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "text":
            raise UserError(f"{where}: field '{field}[{j}].text' must be a string")
        elif kind is None:
            raise UserError(f"{where}: field '{field}[{j}]' must be a {{type, ...}} part")
        else:
            raise UserError(f"{where}: field '{field}[{j}]' is a {kind!r} part; posttrain trains text-only "
                            f"models (remove rows with images or other media from the data)")
    return "".join(out)


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
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise UserError(f"{where}: field '{field}[{i}].tool_calls' must be a list")
        if isinstance(content, list):
            content = _text(content, where, f"{field}[{i}].content")
        elif content is None and role == "assistant" and calls:
            content = ""
        elif not isinstance(content, str):
            raise UserError(f"{where}: field '{field}[{i}].content' must be a string")
        # Extra keys stay for the template; null ones are absent (Arrow structs fill them with null).
        msg = {k: v for k, v in m.items() if v is not None}
        msg["role"], msg["content"] = role, content
        out.append(msg)
    return out


def sft_messages(row, src: str, n: int) -> list[dict]:
    """An SFT row: `messages` with at least one assistant turn, or `prompt` + `completion`."""
    where = _where(src, n)
    row = _present(row, where)
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


def prompt_row(row, src: str, n: int, need_truth: bool = True) -> dict:
    """A prompt row (eval, RL): `messages` (the prompt turns) or `prompt`, plus `ground_truth`
    (optional with need_truth=False: generation, distillation, reward-model scoring)."""
    where = _where(src, n)
    row = _present(row, where)
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
    if gt is None and need_truth:
        raise UserError(f"{where}: field 'ground_truth' missing")
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        gt = str(gt)
    if gt is not None and not isinstance(gt, (str, list)):
        raise UserError(f"{where}: field 'ground_truth' must be a string")
    dataset = row.get("dataset") or row.get("domain")
    if dataset is not None and not isinstance(dataset, str):
        raise UserError(f"{where}: field 'dataset' must be a string")
    # Extra fields (constraint_type, tests, ...) stay available to verifiers.
    return {**row, "messages": msgs, "ground_truth": gt, "dataset": dataset, "src": where}


def _response(value, where: str, field: str) -> dict:
    """A response: a string, one assistant message, or a message list ending in one."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        value = [value]
    msgs = check_messages(value, where, field)
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: field '{field}' must end with an assistant turn")
    return msgs[-1]


def _prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    msgs = check_messages(value, where, "prompt")
    if msgs[-1]["role"] == "assistant":
        raise UserError(f"{where}: field 'prompt' must end with a user (or system/tool) turn, not an assistant turn")
    return msgs


def preference_row(row, src: str, n: int) -> dict:
    """A preference row -> {"prompt": messages, "responses": best first, "margin": float | None, "drop": reason}.

    Accepted shapes (the public datasets' own):
    - `chosen` / `rejected` message lists holding the whole conversation (tulu-3
      preference mixture); their turns before the last must be the same (the prompt);
      an optional `prompt` string is then ignored;
    - `prompt` (string or messages) + `chosen` / `rejected` strings or single answers;
    - Llama 3's `edited` next to `chosen` / `rejected`: edited > chosen > rejected;
    - `prompt` + `ranked`: K >= 2 responses, best first (InstructGPT).
    An optional number `margin` feeds the Llama 2 margin term. A malformed row
    is an error; chosen identical to rejected is a counted drop (`drop`).
    """
    where = _where(src, n)
    row = _present(row, where)
    if "ranked" in row:
        ranked = row["ranked"]
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise UserError(f"{where}: field 'ranked' must list at least 2 responses, best first")
        if "prompt" not in row:
            raise UserError(f"{where}: field 'prompt' missing (a 'ranked' row needs its prompt)")
        prompt = _prompt(row["prompt"], where)
        responses = [_response(r, where, f"ranked[{i}]") for i, r in enumerate(ranked)]
    else:
        names = [k for k in ("edited", "chosen", "rejected") if k in row]
        for key in ("chosen", "rejected"):
            if key not in row:
                raise UserError(f"{where}: field '{key}' missing (preference rows need 'chosen' and 'rejected', "
                                f"or 'prompt' + 'ranked')")
        convs = {}
        for key in names:
            value = row[key]
            if isinstance(value, list) and len(value) > 1:
                msgs = check_messages(value, where, key)
                if msgs[-1]["role"] != "assistant":
                    raise UserError(f"{where}: field '{key}' must end with an assistant turn")
                convs[key] = (msgs[:-1], msgs[-1])
            else:
                convs[key] = (None, _response(value, where, key))
        prompts = {key: p for key, (p, _) in convs.items() if p is not None}
        if len(prompts) == len(convs):
            first = names[0]
            for key in names[1:]:
                if prompts[key] != prompts[first]:
                    raise UserError(f"{where}: fields '{first}' and '{key}' have different prompts "
                                    f"(every turn before the last must match)")
            prompt = prompts[first]
        elif "prompt" in row:
            prompt = _prompt(row["prompt"], where)
            for key, p in prompts.items():
                if p != prompt:
                    raise UserError(f"{where}: field '{key}' holds a conversation whose turns differ from 'prompt'")
        else:
            raise UserError(f"{where}: field 'prompt' missing ('chosen'/'rejected' hold only answers)")
        responses = [convs[k][1] for k in names]
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise UserError(f"{where}: field 'margin' must be a number")
    contents = [r["content"] for r in responses]
    drop = "identical" if len(set(contents)) < len(contents) else None
    return {"prompt": prompt, "responses": responses, "margin": None if margin is None else float(margin),
            "drop": drop, "src": where}


def require_margins(rows: list[dict], key: str) -> None:
    """With a stage's `margin: true` (`key`), every training row must carry a number `margin`."""
    missing = next((r for r in rows if r["margin"] is None), None)
    if missing is not None:
        raise UserError(f"{missing['src']}: field 'margin' missing ({key} is true, so every training row "
                        f"needs a number 'margin')")


def open_prompt_row(row, src: str, n: int) -> dict:
    """A prompt row whose `ground_truth` is optional (None when absent)."""
    return prompt_row(row, src, n, need_truth=False)


ROW_SCHEMAS = {"sft": sft_messages, "prompt": prompt_row, "open_prompt": open_prompt_row,
               "preference": preference_row}
