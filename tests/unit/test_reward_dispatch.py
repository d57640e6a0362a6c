"""Reward dispatch: which verifiers grade a row, weighted sums worked out by hand, config and row
errors, and verifiers that raise or hang (scored 0, counted, warned, never raised)."""

from __future__ import annotations

import importlib.util
import signal
import threading
import time

import pytest

from posttrain_cli.errors import UserError
from posttrain_cli.rewards import VERIFIERS, dispatch
from posttrain_cli.rewards.dispatch import Rewards, check_config

# The files that run code sandboxes share an xdist group and run one after another: process limits
# are per sandbox (a leased uid each), but tests/unit/test_sandbox_adversarial.py counts the
# processes left under the pool's uids machine-wide, which another file's sandboxes would be.


def row(dataset, truth="42", src="p.jsonl: row 1", **extra) -> dict:
    return {"messages": [{"role": "user", "content": "q"}], "dataset": dataset, "ground_truth": truth,
            "src": src, **extra}


@pytest.fixture
def fake(monkeypatch):
    """Register throwaway verifiers for one test only."""
    def add(name, fn):
        monkeypatch.setitem(VERIFIERS, name, fn)
        return name
    return add


# -- which verifiers grade a row --

@pytest.mark.parametrize("dataset,expected", [
    ("gsm8k", ("number",)),             # known public dataset
    ("openai/gsm8k", ("number",)),      # org/ prefix dropped
    ("MATH", ("math",)),                # case-insensitive (RLVR-GSM-MATH-IF uses "MATH")
    ("ifeval", ("ifeval",)),
    ("exact", ("exact",)),              # a verifier's own name
    ("mine", ("exact", "number")),      # mapped in `verifiers`
    ("MINE", ("exact", "number")),      # mapping keys match case-insensitively too
    ("gsm8k_hard", ("number",)),        # mapped, wins over the alias
    ("unknown", ("exact",)),            # the stage default
    (None, ("exact",)),
])
def test_resolution(dataset, expected):
    cfg = {"verifier": "exact", "verifiers": {"mine": ["exact", "number"], "gsm8k_hard": "number"}}
    assert Rewards(cfg).verifiers_for(row(dataset)) == expected


def test_extra_verifiers_are_appended_once():
    r = Rewards({"verifier": "number", "extra_verifiers": ["format", "number"]})
    assert r.verifiers_for(row("anything")) == ("number", "format")
    assert r.names([row("gsm8k"), row("ifeval")]) == ["format", "ifeval", "number"]


def test_unresolvable_row_is_a_user_error():
    r = Rewards({"extra_verifiers": ["format"]}, where="stages.grpo")
    with pytest.raises(UserError) as err:
        r.check_rows([row("gsm8k"), row("trivia", src="qa.jsonl: row 7")])
    msg = str(err.value)
    assert "qa.jsonl: row 7" in msg and "'dataset'" in msg and "'trivia'" in msg
    assert "stages.grpo.verifier" in msg and "stages.grpo.verifiers: {trivia: <verifier>}" in msg
    with pytest.raises(UserError, match=r"r\.jsonl: row 2: .*no 'dataset' field and stages\.grpo\.verifier is not set"):
        r.check_rows([row(None, src="r.jsonl: row 2")])


def test_unresolvable_row_suggests_the_reward_model_when_asked():
    """A stage that could score with a reward model (rejection_sampling) says so; others do not."""
    suggest = ", or score with a reward model: stages.rs.reward_model"
    for asked in (False, True):
        r = Rewards({"extra_verifiers": ["format"]}, where="stages.rs", suggest_reward_model=asked)
        for dataset in ("trivia", None):
            with pytest.raises(UserError) as err:
                r.check_rows([row(dataset)])
            assert str(err.value).endswith(suggest) == asked


def test_rows_need_a_ground_truth_for_graders_but_not_for_format():
    Rewards({"verifier": "format"}).check_rows([row(None, truth=None)])
    with pytest.raises(UserError, match="q.jsonl: row 3.*'ground_truth'.*'number'"):
        Rewards({"verifier": "number"}).check_rows([row(None, truth=None, src="q.jsonl: row 3")])


def test_rows_needing_a_missing_dependency(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(UserError, match=r"row 2.*'MATH'.*'math'.*pip install 'posttrain\[math\]'"):
        Rewards({"verifier": "number"}).check_rows([row("gsm8k"), row("MATH", src="m.jsonl: row 2")])


# -- config checks --

@pytest.mark.parametrize("cfg,match", [
    ({"verifier": "numbr"}, r"stages\.grpo\.verifier: 'numbr' is not a verifier .*did you mean 'number'"),
    ({"verifiers": {"gsm8k": "numbr"}}, r"stages\.grpo\.verifiers\.gsm8k: 'numbr'.*did you mean 'number'"),
    ({"verifiers": {"mix": ["number", "fromat"]}}, r"stages\.grpo\.verifiers\.mix\[1\]: 'fromat'.*'format'"),
    ({"verifiers": {"mix": []}}, r"stages\.grpo\.verifiers\.mix is empty"),
    ({"verifiers": ["number"]}, r"stages\.grpo\.verifiers must map"),
    ({"extra_verifiers": ["format", "formt"]}, r"stages\.grpo\.extra_verifiers\[1\]: 'formt'"),
    ({"extra_verifiers": [3]}, r"stages\.grpo\.extra_verifiers=\[3\] must be"),
    ({"verifier": 3}, r"stages\.grpo\.verifier=3 must be a verifier name"),
    ({"reward_weights": {"fromat": 0.5}}, r"stages\.grpo\.reward_weights\.fromat: 'fromat'.*'format'"),
    ({"reward_weights": {"format": "high"}}, r"stages\.grpo\.reward_weights\.format='high' must be a finite number"),
    ({"verifier_timeout": -1}, r"stages\.grpo\.verifier_timeout=-1 must be a number of seconds > 0"),
    ({"verifier_timeout": 0}, r"verifier_timeout=0 must be"),
    ({"verifier_timeout": True}, r"verifier_timeout=True must be"),
])
def test_check_config_errors(cfg, match):
    with pytest.raises(UserError, match=match):
        check_config(cfg, "stages.grpo")


def test_check_config_accepts_a_full_r1_setup():
    check_config({"verifier": None, "verifiers": {"gsm8k": "number", "MATH": ["math"]},
                  "extra_verifiers": ["format"], "reward_weights": {"format": 0.1, "number": 1},
                  "verifier_timeout": 5}, "stages.grpo")


def test_check_config_missing_dependency(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(UserError, match=r"stages\.grpo\.verifiers\.MATH: verifier 'math' needs .*posttrain\[math\]"):
        check_config({"verifiers": {"MATH": "math"}}, "stages.grpo")


# -- scores --

def test_weighted_sum_by_hand():
    cfg = {"verifiers": {"gsm8k": "number"}, "extra_verifiers": ["format"], "reward_weights": {"format": 0.25}}
    r = Rewards(cfg)
    rows = [row("gsm8k", "42"), row("gsm8k", "42"), row("gsm8k", "7")]
    total, per = r.score(["<think>6 x 7</think> 42", "42", "<think>6 x 7</think> 42"], rows)
    # 1 x number + 0.25 x format:  1 + 0.25,  1 + 0,  0 + 0.25
    assert total == [1.25, 1.0, 0.25]
    assert per == [{"number": 1.0, "format": 1.0}, {"number": 1.0, "format": 0.0}, {"number": 0.0, "format": 1.0}]
    assert r.calls == {"number": 3, "format": 3} and not r.failures and r.summary() is None


def test_mixed_datasets_in_one_batch():
    pytest.importorskip("math_verify")
    r = Rewards({"reward_weights": {"math": 2.0}})
    rows = [row("gsm8k", "12"), row("MATH", "\\frac{1}{2}"), row("MATH", "\\frac{1}{2}")]
    total, per = r.score(["so 12", "\\boxed{0.5}", "\\boxed{2}"], rows)
    assert total == [1.0, 2.0, 0.0]  # number 1;  2 x math 1;  2 x math 0
    assert per == [{"number": 1.0}, {"math": 1.0}, {"math": 0.0}]


def test_code_goes_through_the_sandbox_batch():
    r = Rewards({"verifier_timeout": 3}, max_workers=2)
    tests = ["assert inc(1) == 2", "assert inc(2) == 3"]
    rows = [row("code", tests), row("mbpp", tests), row("code", tests), row("code", "assert inc(3) == 4\nassert inc(4) == 6")]
    completions = ["```python\ndef inc(x):\n    return x + 1\n```",
                   "```python\ndef inc(x):\n    return 2\n```",
                   "```python\nwhile True:\n    pass\n```",
                   "```python\ndef inc(x):\n    return x + 1\n```"]
    start = time.monotonic()
    total, _ = r.score(completions, rows)
    # right; one of two tests; loops (timed out); format (a) test code is one test, all or nothing
    assert total == [1.0, 0.5, 0.0, 0.0]
    assert time.monotonic() - start < 6
    assert not r.failures  # a program that loops is a wrong answer, not a verifier failure


def test_bad_code_ground_truth_is_a_counted_failure():
    warnings = []
    r = Rewards({"verifier": "code"}, warn=warnings.append)
    total, per = r.score(["```python\nx = 1\n```"], [row(None, [1, 2], src="c.jsonl: row 9")])
    assert total == [0.0] and r.failures == {"code": 1}
    assert "c.jsonl: row 9" in warnings[-1] and "ValueError" in warnings[-1]


# -- failures: raise, hang, garbage --

def test_raising_verifier_scores_0_and_warns_a_few_times(fake):
    def broken(c, g, r):
        raise KeyError("field")
    warnings = []
    r = Rewards({"verifier": fake("t_broken", broken), "extra_verifiers": ["format"]}, warn=warnings.append)
    total, per = r.score(["<think>a</think> b"] * 5, [row(None, src=f"r{i}") for i in range(5)])
    assert total == [1.0] * 5 and all(p["t_broken"] == 0.0 for p in per)  # format still counts
    assert r.failures == {"t_broken": 5} and not r.timeouts
    assert len(warnings) == dispatch.WARN_FIRST
    assert "verifier 't_broken' failed on r0" in warnings[0] and "KeyError" in warnings[0]
    assert "only counted" in warnings[-1]
    assert r.summary() == "verifier failures (scored 0): t_broken: 5/5"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, "high"])
def test_non_numeric_scores_are_failures(fake, value):
    r = Rewards({"verifier": fake("t_odd", lambda c, g, r: value)}, warn=lambda m: None)
    assert r.score(["x"], [row(None)])[0] == [0.0] and r.failures == {"t_odd": 1}


def spin(c, g, r):
    while True:
        try:
            while True:
                pass
        except Exception:  # a verifier's broad except must not swallow the timeout
            pass


def test_hanging_verifier_times_out_on_the_main_thread(fake):
    r = Rewards({"verifier": fake("t_spin", spin), "verifier_timeout": 0.3}, warn=lambda m: None)
    start = time.monotonic()
    total, _ = r.score(["x", "y"], [row(None), row(None)])
    assert total == [0.0, 0.0] and time.monotonic() - start < 1.5
    assert r.failures == {"t_spin": 2} and r.timeouts == {"t_spin": 2}


def test_outer_alarm_is_restored(fake):
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        r = Rewards({"verifier": fake("t_spin", spin), "verifier_timeout": 0.2}, warn=lambda m: None)
        r.score(["x"], [row(None)])
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0.5 < left < 0.85  # about 1.0 - 0.2 left
        time.sleep(left + 0.2)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_hanging_verifier_times_out_off_the_main_thread(fake):
    r = Rewards({"verifier": fake("t_spin", spin), "verifier_timeout": 0.3}, warn=lambda m: None)
    out = {}

    def work():
        start = time.monotonic()
        out["total"] = r.score(["x", "y"], [row(None), row(None)])[0]
        out["seconds"] = time.monotonic() - start

    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    assert out["total"] == [0.0, 0.0] and out["seconds"] < 1.5 and r.timeouts == {"t_spin": 2}


def test_no_late_timeout_after_a_verifier_returns(fake):
    # Verifiers that finish right at the deadline: a timeout must never land after score() returns.
    def busy(c, g, r):
        end = time.monotonic() + 0.02
        while time.monotonic() < end:
            pass
        return 1.0

    r = Rewards({"verifier": fake("t_busy", busy), "verifier_timeout": 0.02}, warn=lambda m: None)
    errors = []

    def work():
        try:
            for _ in range(20):
                r.score(["x"], [row(None)])
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                pass
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    work()  # main thread: SIGALRM
    t = threading.Thread(target=work)  # other thread: the watchdog
    t.start()
    t.join(10)
    assert errors == [] and r.calls["t_busy"] == 40
