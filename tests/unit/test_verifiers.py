from __future__ import annotations

import pytest

from posttrain_cli.rewards import VERIFIERS

# The files that run code sandboxes share an xdist group and run one after another: process limits
# are per sandbox (a leased uid each), but tests/unit/test_sandbox_adversarial.py counts the
# processes left under the pool's uids machine-wide, which another file's sandboxes would be.


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


def test_graded_part_skips_the_reasoning():
    # The answer only inside the reasoning earns nothing; an unclosed <think> has no answer.
    assert VERIFIERS["number"]("<think>it is 68</think> I am not sure", "68", {}) == 0.0
    assert VERIFIERS["number"]("<think>68 or 69?</think> 68", "68", {}) == 1.0
    assert VERIFIERS["number"]("<think>the answer is 68", "68", {}) == 0.0
    assert VERIFIERS["exact"]("<think>yes</think>\nyes", "yes", {}) == 1.0


# -- format (R1) --

@pytest.mark.parametrize("completion,score", [
    ("<think>2 + 2 = 4</think>4", 1.0),
    ("  <think>\n2 + 2 = 4\n</think>\n\nThe answer is 4.\n", 1.0),        # whitespace anywhere
    ("2 + 2 = 4</think> 4", 1.0),                                        # template opened <think>
    ("<think>2 + 2 = 4</think> <answer> 4 </answer>", 1.0),
    ("<think>2 + 2 = 4</think>", 0.0),                                   # no answer
    ("<think>2 + 2 = 4</think>   \n", 0.0),
    ("<think> </think> 4", 0.0),                                         # no reasoning
    ("4", 0.0),                                                          # no think block
    ("", 0.0),
    ("<think>2 + 2 = 4", 0.0),                                           # never closed
    ("<think>a</think><think>b</think> 4", 0.0),                         # two think blocks
    ("<think>a</think> 4 </think>", 0.0),
    ("Sure! <think>a</think> 4", 0.0),                                   # text before <think>
    ("a <think>b</think> 4", 0.0),
    ("<think>a</think> <answer></answer>", 0.0),                         # empty tagged answer
    ("<think>a</think> <answer>4</answer> so 4", 0.0),                   # text outside the tags
    ("<think>a</think> <answer>4</answer><answer>5</answer>", 0.0),
    ("<think>a</think> <answer>4", 0.0),
])
def test_format(completion, score):
    assert VERIFIERS["format"](completion, None, {}) == score


# -- math (math-verify) --

@pytest.fixture
def math_score():
    pytest.importorskip("math_verify")
    return lambda completion, truth: VERIFIERS["math"](completion, truth, {})


@pytest.mark.parametrize("completion,truth,score", [
    ("So the probability is \\boxed{\\frac{3}{4}}.", "3/4", 1.0),
    ("\\boxed{0.75}", "\\frac{3}{4}", 1.0),                               # same number, other form
    ("\\boxed{1+x^2}", "x^2+1", 1.0),                                     # same expression
    ("\\boxed{x^2+2}", "x^2+1", 0.0),
    ("\\boxed{\\frac{3}{5}}", "3/4", 0.0),
    ("\\boxed{3/4}", "We add them: $\\frac12 + \\frac14 = \\boxed{\\frac{3}{4}}$.", 1.0),  # a solution
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "3/4", 1.0),  # Minerva format
    ("\\boxed{2}", ["3/4", "2"], 1.0),                                    # any listed answer
    ("<think>I get 0.75</think> \\boxed{3/4}", "3/4", 1.0),
])
def test_math_right_and_wrong(math_score, completion, truth, score):
    assert math_score(completion, truth) == score


@pytest.mark.parametrize("completion", [
    "<think>so it is \\boxed{3/4}</think> I cannot tell.",               # only inside the reasoning
    "<think>so it is \\boxed{3/4}",                                      # reasoning never closed
    "It is \\boxed{3/4} or maybe \\boxed{1/2}.",                         # hedging: two answers
    "\\boxed{1/2}, no wait, \\boxed{3/4}",
    "",
    "   ",
    "<think>x</think>",
    "3/4",                                                               # no box, no "answer is"
    "\\boxed{}",
])
def test_math_adversarial_scores_0(math_score, completion):
    assert math_score(completion, "3/4") == 0.0


def test_math_same_answer_boxed_twice_counts(math_score):
    # Two boxes with one value (written two ways) is not hedging.
    assert math_score("\\boxed{3/4}, i.e. \\boxed{0.75}", "3/4") == 1.0


def test_math_set_answer_boxed_separately(math_score):
    assert math_score("x = \\boxed{1} or x = \\boxed{2}", "1, 2") == 1.0
    assert math_score("x = \\boxed{1} or \\boxed{2} or \\boxed{3}", "1, 2") == 0.0


def test_math_unparseable_truth_raises(math_score):
    with pytest.raises(ValueError, match="ground truth"):
        math_score("\\boxed{1}", "")


def test_missing_dependency_hint(monkeypatch):
    import importlib.util

    from posttrain_cli.rewards import missing_dependency

    assert missing_dependency("number") is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    hint = missing_dependency("math")
    assert "math_verify" in hint and "pip install 'posttrain[math]'" in hint


# -- code --

def test_extract_code():
    from posttrain_cli.rewards.verifiers import extract_code

    assert extract_code("Here:\n```python\nx = 1\n```\nthen\n```python\nx = 2\n```\nOutput:\n```\n2\n```") == "x = 2\n"
    assert extract_code("```\nx = 3\n```") == "x = 3\n"                      # any fence
    assert extract_code("x = 4") == "x = 4"                                  # no fence: whole answer
    assert extract_code("```python\nx = 5\n") == "x = 5\n"                   # cut before the closing fence
    assert extract_code("<think>```python\nx = 6\n```</think>") == ""        # only in the reasoning


def test_code_ground_truth_formats():
    from posttrain_cli.rewards.verifiers import code_tests

    t = code_tests("assert f(1) == 2\nassert f(2) == 3")                     # (a) one test
    assert (t.kind, t.cases) == ("asserts", ["assert f(1) == 2\nassert f(2) == 3"])
    assert code_tests(["assert f(1) == 2", "assert f(2) == 3"]).cases == ["assert f(1) == 2", "assert f(2) == 3"]
    assert code_tests('["assert f(1) == 2"]').cases == ["assert f(1) == 2"]  # (b) as JSON
    io = code_tests('[{"input": "1\\n", "output": "2"}]')                    # (c) as JSON
    assert (io.kind, io.cases) == ("stdio", [("1\n", "2")])
    apps = code_tests({"inputs": ["1\n", "2\n"], "outputs": ["2\n", "3\n"]})  # (d)
    assert apps.cases == [("1\n", "2\n"), ("2\n", "3\n")]
    human = code_tests("def check(candidate):\n    assert candidate(1) == 2\n", {"entry_point": "inc"})
    assert human.cases[0].endswith("check(inc)\n")
    for bad in ("", [], [1, 2], {"inputs": ["1"], "outputs": ["2"], "fn_name": "f"}, None):
        with pytest.raises(ValueError):
            code_tests(bad)


SOLUTION = "```python\ndef inc(x):\n    return x + 1\n```"


def test_code_right_wrong_half():
    code = VERIFIERS["code"]
    assert code(SOLUTION, ["assert inc(1) == 2", "assert inc(2) == 3"], {}) == 1.0
    assert code(SOLUTION, ["assert inc(1) == 2", "assert inc(2) == 4"], {}) == 0.5
    assert code("```python\ndef inc(x):\n    return x\n```", ["assert inc(1) == 2"], {}) == 0.0
    stdio = [{"input": "1\n", "output": "2\n"}, {"input": "5\n", "output": "6"}]
    assert code("```python\nprint(int(input()) + 1)\n```", stdio, {}) == 1.0


@pytest.mark.parametrize("completion", [
    "",                                                                  # empty output
    "<think>```python\ndef inc(x):\n    return x + 1\n```</think> done",  # only inside the reasoning
    "```python\ndef inc(x) return x + 1\n```",                            # does not parse
    "```python\nraise SystemExit(3)\ndef inc(x):\n    return x + 1\n```",
])
def test_code_adversarial_scores_0(completion):
    assert VERIFIERS["code"](completion, ["assert inc(1) == 2"], {}) == 0.0
