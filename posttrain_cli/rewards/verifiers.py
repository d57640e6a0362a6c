"""Rule-based verifiers: `number`, `exact`, `format` (1.0 or 0.0) and `code` (fraction of tests).

All but `format` grade `answer_part(completion)`: an answer only inside the reasoning earns nothing.

`format` (DeepSeek-R1 sec. 2.2.2): 1.0 for `<think>` reasoning `</think>` then the answer, else 0.
Exactly one `</think>`; at most one `<think>`, and only at the very start (the chat templates of
R1-distill and Qwen3 end the prompt with `<think>`, so the completion may lack it). Reasoning and
answer must both hold non-whitespace; whitespace around tags and at either end is ignored. An
answer in `<answer>` tags must be exactly one `<answer>...</answer>` with nothing outside it.

`code`: the last ```python (or ```py) fenced block of the answer part, else the last fenced block
of any language, else the whole answer, run against the row's tests in a sandbox
(posttrain_cli/rewards/sandbox.py; never in this process). The tests run in another process than
the code and see its functions' results as plain data (None, numbers, str, bytes and lists,
tuples, sets, dicts of them), so a completion cannot make its own tests pass; a result of another
type (a generator, an instance of its own class) fails. The score is the fraction of tests
passed: code that does not run scores 0, and tests it has not passed when it runs out of time
or memory fail. Ground truth formats:
  (a) a string of Python test code (asserts), run after the solution: one test, all or nothing.
      HumanEval style: when it defines `check` but never calls it, `check(<row['entry_point']>)`
      is appended;
  (b) a list of assert statements (or a JSON string of one), each counted separately;
  (c) a list (or a JSON string of one) of {"input": str, "output": str}: the program reads stdin
      and passes a case when its stdout matches, up to trailing whitespace on each line;
  (d) APPS/TACO's {"inputs": [...], "outputs": [...]} (as (c); "fn_name" call tests are not
      supported and raise ValueError).
Anything else raises ValueError (the dispatcher scores 0 and warns).
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from typing import TYPE_CHECKING

from posttrain_cli.rewards import register

if TYPE_CHECKING:
    from posttrain_cli.rewards import sandbox

# A number as people write it: -1,234.5, 3/4, 1e3; GSM8K answers use commas.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    text = text.strip().replace(",", "").rstrip(".")
    try:
        if "/" in text:
            num, den = text.split("/")
            return Fraction(num) / Fraction(den)
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answer_part(completion: str) -> str:
    """The part of a completion a verifier grades: after the last `</think>` when the model reasoned
    (R1 style), nothing when it opened `<think>` and never closed it, else the whole completion.
    An answer that appears only inside the reasoning therefore earns nothing."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    if "<think>" in completion:
        return ""
    return completion


def last_number(text: str) -> Fraction | None:
    """The final number in a completion (GSM8K convention: the answer comes last)."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


@register("number", needs_ground_truth=True)
def number(completion: str, ground_truth: str, row: dict | None = None) -> float:
    # GSM8K ground truths may carry the worked solution before '#### 42'.
    truth = parse_number(ground_truth.split("####")[-1])
    if truth is None:
        truth = last_number(ground_truth)
    got = last_number(answer_part(completion))
    return float(truth is not None and got is not None and got == truth)


@register("exact", needs_ground_truth=True)
def exact(completion: str, ground_truth: str, row: dict | None = None) -> float:
    return float(answer_part(completion).strip() == ground_truth.strip())


_THINK = re.compile(r"\A\s*(?:<think>)?(.*?)</think>(.*)\Z", re.S)
_ANSWER = re.compile(r"\A<answer>(.*)</answer>\Z", re.S)


@register("format")
def r1_format(completion: str, ground_truth=None, row: dict | None = None) -> float:
    if completion.count("</think>") != 1 or completion.count("<think>") > 1:
        return 0.0
    m = _THINK.match(completion)
    if not m or "<think>" in m.group(1):  # an opening tag, if any, only at the start
        return 0.0
    reasoning, answer = m.group(1).strip(), m.group(2).strip()
    if not reasoning or not answer:
        return 0.0
    if "<answer>" in answer or "</answer>" in answer:
        tagged = _ANSWER.match(answer)
        if (not tagged or answer.count("<answer>") != 1 or answer.count("</answer>") != 1
                or not tagged.group(1).strip()):
            return 0.0
    return 1.0


_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)```", re.S)
_OPEN_FENCE = re.compile(r"```[^\n`]*\n(.*)\Z", re.S)


def extract_code(completion: str) -> str:
    """The code a completion answers with (see the module docstring)."""
    answer = answer_part(completion)
    blocks = _FENCE.findall(answer)
    python = [body for lang, body in blocks if lang.strip().lower() in ("python", "py", "python3")]
    if python or blocks:
        return (python or [body for _, body in blocks])[-1]
    unclosed = _OPEN_FENCE.search(answer)  # cut off by max_new_tokens before the closing fence
    return unclosed.group(1) if unclosed else answer


def code_tests(ground_truth, row: dict | None = None) -> sandbox.Tests:
    """A row's ground truth as sandbox tests (formats (a)-(d) above); ValueError if it is none."""
    from posttrain_cli.rewards import sandbox  # subprocess & co: not at CLI start-up

    truth = ground_truth
    if isinstance(truth, str) and truth.lstrip()[:1] in ("[", "{"):
        try:
            truth = json.loads(truth)
        except ValueError:
            pass  # Python test code that happens to start with a bracket
    if isinstance(truth, dict) and "inputs" in truth and "outputs" in truth:
        if truth.get("fn_name"):
            raise ValueError("code ground truth: call-based tests (fn_name) are not supported")
        truth = [{"input": i, "output": o} for i, o in zip(truth["inputs"], truth["outputs"])]
    if isinstance(truth, str) and truth.strip():
        entry = (row or {}).get("entry_point")
        if entry and re.search(r"^def check\(", truth, re.M) and not re.search(r"^check\(", truth, re.M):
            truth += f"\n\ncheck({entry})\n"
        return sandbox.Tests("asserts", [truth])
    if isinstance(truth, list) and truth:
        if all(isinstance(t, str) for t in truth):
            return sandbox.Tests("asserts", list(truth))
        if all(isinstance(t, dict) and "input" in t and "output" in t for t in truth):
            return sandbox.Tests("stdio", [(_text(t["input"]), _text(t["output"])) for t in truth])
    raise ValueError(f"code ground truth: expected test code, a list of asserts or a list of "
                     f"{{input, output}} cases, got {str(ground_truth)[:80]!r}")


def _text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def code_batch(completions: list[str], ground_truths: list, rows: list[dict], *, timeout: float = 10.0,
               max_workers: int | None = None) -> list[float | Exception]:
    """`code` for many completions, sandboxes running concurrently; a bad ground truth or a
    sandbox that cannot start gives that item's exception instead of a score."""
    from posttrain_cli.rewards import sandbox

    out: list[float | Exception] = [0.0] * len(completions)
    jobs, where = [], []
    for i, (completion, truth, row) in enumerate(zip(completions, ground_truths, rows)):
        try:
            tests = code_tests(truth, row)
        except ValueError as e:
            out[i] = e
            continue
        program = extract_code(completion)
        if program.strip():
            jobs.append((program, tests))
            where.append(i)
    for i, result in zip(where, sandbox.run_many(jobs, sandbox.Limits(timeout=timeout), max_workers)):
        out[i] = result if isinstance(result, Exception) else result.score
    return out


@register("code", needs_ground_truth=True, batch=code_batch)
def code(completion: str, ground_truth, row: dict | None = None) -> float:
    score = code_batch([completion], [ground_truth], [row or {}])[0]
    if isinstance(score, Exception):
        raise score
    return score
