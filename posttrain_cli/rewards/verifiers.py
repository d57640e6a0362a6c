"""Rule-based verifiers. Each returns 1.0 for a correct completion, else 0.0."""

from __future__ import annotations

import re
from fractions import Fraction

from posttrain_cli.rewards import register

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


def last_number(text: str) -> Fraction | None:
    """The final number in a completion (GSM8K convention: the answer comes last)."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


@register("number")
def number(completion: str, ground_truth: str, row: dict | None = None) -> float:
    # GSM8K ground truths may carry the worked solution before '#### 42'.
    truth = parse_number(ground_truth.split("####")[-1])
    if truth is None:
        truth = last_number(ground_truth)
    got = last_number(completion)
    return float(truth is not None and got is not None and got == truth)


@register("exact")
def exact(completion: str, ground_truth: str, row: dict | None = None) -> float:
    return float(completion.strip() == ground_truth.strip())
