from __future__ import annotations

import pytest

from posttrain_cli.rewards import VERIFIERS


@pytest.mark.parametrize("completion,truth,score", [
    ("68", "68", 1.0),
    ("The answer is 68.", "68", 1.0),
    ("12 + 56 = 68", "68", 1.0),          # the last number counts
    ("68 or maybe 69", "68", 0.0),
    ("1,234", "1234", 1.0),
    ("0.5", "1/2", 1.0),
    ("-3", "-3", 1.0),
    ("", "68", 0.0),
    ("sixty-eight", "68", 0.0),
    ("42", "Work: 40 + 2\n#### 42", 1.0),  # GSM8K ground truth
])
def test_number(completion, truth, score):
    assert VERIFIERS["number"](completion, truth, {}) == score


def test_exact():
    assert VERIFIERS["exact"](" yes\n", "yes", {}) == 1.0
    assert VERIFIERS["exact"]("Yes", "yes", {}) == 0.0
