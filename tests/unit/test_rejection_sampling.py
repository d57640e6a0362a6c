"""Rejection sampling's selection on hand-made scores, the prompt-length cut, and the rows that
generate and rejection_sampling write (SFT rows that also read back as prompt rows)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from posttrain_cli.data.schemas import open_prompt_row, sft_messages
from posttrain_cli.errors import UserError
from posttrain_cli.rollout import sampling
from posttrain_cli.rollout.sampling import Sample
from posttrain_cli.stages.rejection_sampling import passes, select


def S(prompt, index, score, text=None, reason="eos", scores=None):
    return Sample(prompt, index, text if text is not None else f"p{prompt}s{index}", reason, 3, score, scores or {})


def kept(samples, **kw):
    return [(s.prompt, s.index) for s in select(samples, **kw)]


# -- keep: best --

def test_best_keeps_the_maximum_of_each_prompt():
    samples = [S(0, 0, 0.1), S(0, 1, 0.9), S(0, 2, -3.0), S(1, 0, -1.0), S(1, 1, -0.5), S(1, 2, -2.0)]
    assert kept(samples, keep="best") == [(0, 1), (1, 1)]


def test_best_tie_keeps_the_first():
    assert kept([S(0, 0, 0.2), S(0, 1, 0.7), S(0, 2, 0.7)], keep="best") == [(0, 1)]


def test_best_threshold_drops_prompts_whose_best_is_below():
    samples = [S(0, 0, 0.4), S(0, 1, 0.5), S(1, 0, 0.3), S(1, 1, 0.49)]
    # 0.5 >= 0.5 is kept (threshold inclusive); prompt 1's best 0.49 is not.
    assert kept(samples, keep="best", threshold=0.5) == [(0, 1)]


def test_truncated_samples_are_dropped_before_selection():
    samples = [S(0, 0, 0.2), S(0, 1, 5.0, reason="length"), S(1, 0, 1.0, reason="length")]
    assert kept(samples, keep="best", drop_truncated=True) == [(0, 0)]
    assert kept(samples, keep="best", drop_truncated=False) == [(0, 1), (1, 0)]


def test_prompts_come_out_in_order_of_appearance():
    samples = [S(3, 0, 1.0), S(3, 1, 2.0), S(1, 0, 0.0), S(1, 1, 0.5)]
    assert kept(samples, keep="best") == [(3, 1), (1, 1)]


# -- keep: all_pass --

def test_all_pass_without_threshold_needs_full_marks_from_every_verifier():
    samples = [
        S(0, 0, 2.0, scores={"number": 1.0, "format": 1.0}),
        S(0, 1, 1.0, scores={"number": 1.0, "format": 0.0}),  # format failed
        S(0, 2, 1.5, scores={"number": 0.5, "format": 1.0}),  # partial credit is not a pass
        S(0, 3, 2.0, scores={"number": 1.0, "format": 1.0}),
        S(1, 0, 0.0, scores={"number": 0.0}),
    ]
    assert kept(samples, keep="all_pass") == [(0, 0), (0, 3)]
    assert not passes(S(0, 0, 5.0, scores={}), None)  # no verifier graded it: nothing passed


def test_all_pass_with_threshold_uses_the_score():
    samples = [S(0, 0, 0.3), S(0, 1, 0.6), S(0, 2, 0.8, scores={"number": 0.0}), S(1, 0, 0.59)]
    assert kept(samples, keep="all_pass", threshold=0.6) == [(0, 1), (0, 2)]


def test_all_pass_keeps_distinct_completions_only():
    full = {"number": 1.0}
    samples = [S(0, 0, 1.0, "42", scores=full), S(0, 1, 1.0, "42", scores=full), S(0, 2, 1.0, "forty-two", scores=full),
               S(0, 3, 1.0, "42", scores=full)]
    assert kept(samples, keep="all_pass") == [(0, 0), (0, 2)]


def test_all_pass_max_per_prompt_keeps_the_highest_scores_in_sample_order():
    samples = [S(0, 0, 0.7), S(0, 1, 0.9), S(0, 2, 0.6), S(0, 3, 0.95), S(0, 4, 0.9)]
    # Passing (>= 0.65): 0.7, 0.9, 0.95, 0.9; the top 2 are s3 (0.95) and s1 (0.9, first of the equal 0.9s).
    assert kept(samples, keep="all_pass", threshold=0.65, max_per_prompt=2) == [(0, 1), (0, 3)]
    assert kept(samples, keep="all_pass", threshold=0.65) == [(0, 0), (0, 1), (0, 3), (0, 4)]


def test_all_pass_drops_truncated_even_when_they_pass():
    samples = [S(0, 0, 1.0, scores={"number": 1.0}, reason="length"), S(0, 1, 1.0, "b", scores={"number": 1.0})]
    assert kept(samples, keep="all_pass", drop_truncated=True) == [(0, 1)]


# -- prompts that leave no room for max_new_tokens --

def test_fitting_keeps_prompts_within_max_seq_len_minus_max_new_tokens():
    # budget 10 - 4 = 6 tokens: 6 fits exactly, 7 does not.
    assert sampling.fitting([3, 7, 6, 12, 1], max_seq_len=10, max_new_tokens=4) == [0, 2, 4]


class CharTokenizer:
    """One token per character of the rendered chat: a prompt's length is worked out by hand."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "".join(f"<{m['content']}>" for m in messages) + ("A:" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _ctx(tmp_path, rows, **cfg):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = {"path": str(data), "from": None, "split": "train", "name": None, "weight": 1.0}
    info = []
    ctx = SimpleNamespace(cfg={"data": [src], "max_seq_len": 12, "max_new_tokens": 4, "limit": None, **cfg},
                          seed=0, datasets={}, info=info.append, where=lambda k="": f"stages.gen.{k}".rstrip("."))
    return ctx, info


def test_load_drops_and_counts_long_prompts(tmp_path):
    # "<1+1>A:" is 7 tokens, "<123+4>A:" 9 (budget 12 - 4 = 8): the second is dropped.
    rows = [{"prompt": "1+1"}, {"prompt": "123+4"}, {"messages": [{"role": "user", "content": "2+2"}]}]
    ctx, info = _ctx(tmp_path, rows)
    p = sampling.load(ctx, CharTokenizer())
    assert [r["messages"][0]["content"] for r in p.rows] == ["1+1", "2+2"]
    assert p.index == [0, 2] and p.too_long == 1 and [len(i) for i in p.ids] == [7, 7]
    assert "1 longer than 8 tokens dropped" in info[0]


def test_load_limit_takes_the_first_prompts(tmp_path):
    ctx, _ = _ctx(tmp_path, [{"prompt": "1"}, {"prompt": "2"}, {"prompt": "3"}], limit=2)
    assert [r["messages"][0]["content"] for r in sampling.load(ctx, CharTokenizer()).rows] == ["1", "2"]


def test_load_with_no_prompt_left_is_a_user_error(tmp_path):
    ctx, _ = _ctx(tmp_path, [{"prompt": "123456"}])
    with pytest.raises(UserError, match=r"stages.gen.data: every one of 1 prompts is longer than .* = 8 tokens"):
        sampling.load(ctx, CharTokenizer())
    ctx, _ = _ctx(tmp_path, [{"prompt": "1"}], max_seq_len=4)
    with pytest.raises(UserError, match=r"stages.gen.max_seq_len=4 leaves no room"):
        sampling.load(ctx, CharTokenizer())


# -- output rows --

def test_output_row_is_an_sft_row_and_a_prompt_row():
    src = open_prompt_row({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"}],
                           "ground_truth": 4, "dataset": "add", "constraint": "x"}, "in.jsonl", 5)
    row = sampling.output_row(src, S(0, 3, 1.0, "4"), prompt_index=7, score=1.0, scores={"number": 1.0})
    assert row == {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2"},
                                {"role": "assistant", "content": "4"}],
                   "ground_truth": "4", "dataset": "add", "constraint": "x", "prompt_index": 7, "sample_index": 3,
                   "finish_reason": "eos", "score": 1.0, "scores": {"number": 1.0}}
    line = json.loads(json.dumps(row))
    assert sft_messages(line, "out.jsonl", 1)[-1] == {"role": "assistant", "content": "4"}
    again = open_prompt_row(line, "out.jsonl", 1)
    assert again["messages"] == src["messages"] and again["ground_truth"] == "4"


def test_output_row_drops_the_input_shape_and_absent_fields():
    src = open_prompt_row({"prompt": "2+2", "completion": "5"}, "in.jsonl", 1)
    row = sampling.output_row(src, S(0, 0, 0.0, "4", reason="length"), prompt_index=0)
    assert row == {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}],
                   "prompt_index": 0, "sample_index": 0, "finish_reason": "length"}


def test_write_rows_merges_rank_parts_in_prompt_order(tmp_path, monkeypatch):
    """Rank 1 writes its part, then rank 0 writes its own and merges both (the barrier is a no-op here)."""
    from posttrain_cli.engine import dist

    ctx = SimpleNamespace(work_dir=tmp_path)
    monkeypatch.setattr(dist, "world", lambda: 2)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    row = lambda p, s: {"messages": [], "prompt_index": p, "sample_index": s}  # noqa: E731
    for rank, rows in ((1, [row(1, 0), row(3, 1), row(3, 0)]), (0, [row(2, 0), row(0, 1), row(0, 0)])):
        monkeypatch.setattr(dist, "rank", lambda r=rank: r)
        monkeypatch.setattr(dist, "is_main", lambda r=rank: r == 0)
        sampling.write_rows(ctx, rows)
    got = [json.loads(l) for l in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in got] == [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0), (3, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


# -- keeping nothing is an error that says why --

@pytest.mark.parametrize("cfg, best, truncated, needles", [
    ({"threshold": 0.5, "keep": "best"}, 0.25, 0,
     ["stages.rs: kept no completion of 3 prompts x 4 samples: the best score, 0.25, is below threshold 0.5; "
      "lower stages.rs.threshold or raise stages.rs.num_samples"]),
    ({"threshold": None, "keep": "all_pass"}, 0.0, 2,
     ["none got full marks (>= 1) from every verifier of its row (2 cut at max_new_tokens were dropped)",
      "set stages.rs.threshold"]),
    ({"threshold": None, "keep": "best"}, float("-inf"), 12,
     ["every sample was cut at max_new_tokens without EOS", "raise stages.rs.max_new_tokens",
      "stages.rs.drop_truncated=false"]),
])
def test_nothing_kept_names_the_stage_and_the_fix(cfg, best, truncated, needles):
    from posttrain_cli.stages.rejection_sampling import _nothing_kept

    ctx = SimpleNamespace(cfg={"num_samples": 4, **cfg}, where=lambda k="": f"stages.rs.{k}".rstrip("."))
    msg = str(_nothing_kept(ctx, 3, best, truncated))
    for n in needles:
        assert n in msg, msg
