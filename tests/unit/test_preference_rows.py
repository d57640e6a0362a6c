"""Preference rows: the accepted shapes, ranked-list expansion, and what happens to bad rows."""

from __future__ import annotations

import pytest

from posttrain_cli.data.preference import as_pairs, ranked_pairs, tokenize
from posttrain_cli.data.schemas import preference_row
from posttrain_cli.errors import UserError

U = {"role": "user", "content": "2+2"}


def a(text):
    return {"role": "assistant", "content": text}


def parse(row):
    return preference_row(row, "prefs.jsonl", 7)


def test_message_lists_share_the_prompt():
    r = parse({"chosen": [U, a("4")], "rejected": [U, a("5")]})
    assert r["prompt"] == [U] and [x["content"] for x in r["responses"]] == ["4", "5"] and r["drop"] is None


def test_prompt_plus_strings_and_tulu_style_prompt_field():
    r = parse({"prompt": "2+2", "chosen": "4", "rejected": "5"})
    assert r["prompt"] == [U] and r["responses"][1] == a("5")
    # tulu-3 preference mixture: a prompt string next to full conversations
    r = parse({"prompt": "2+2", "chosen": [U, a("4")], "rejected": [U, a("5")], "margin": 2})
    assert r["prompt"] == [U] and r["margin"] == 2.0


def test_llama3_edited_ranks_first():
    r = parse({"prompt": "2+2", "edited": "4.", "chosen": "4", "rejected": "5"})
    assert [x["content"] for x in r["responses"]] == ["4.", "4", "5"]


def test_ranked_lists_expand_into_all_pairs():
    """K = 4 answers best first -> C(4,2) = 6 pairs, each (better, worse)."""
    assert ranked_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert ranked_pairs(2) == [(0, 1)]
    r = parse({"prompt": "q", "ranked": ["best", "good", "bad"]})
    assert [x["content"] for x in r["responses"]] == ["best", "good", "bad"]
    ex = [{"answers": [([1], [True]), ([2], [True]), ([3], [True])], "margin": None, "src": "x"}]
    pairs = as_pairs(ex)
    assert [(p["answers"][0][0], p["answers"][1][0]) for p in pairs] == [([1], [2]), ([1], [3]), ([2], [3])]


def test_identical_answers_are_a_counted_drop_not_an_error():
    assert parse({"prompt": "q", "chosen": "x", "rejected": "x"})["drop"] == "identical"


@pytest.mark.parametrize("row, says", [
    ({"chosen": [U, a("4")]}, "field 'rejected' missing"),
    ({"rejected": "5", "prompt": "q"}, "field 'chosen' missing"),
    ({"chosen": "4", "rejected": "5"}, "field 'prompt' missing"),
    ({"chosen": [U, a("4")], "rejected": [{"role": "user", "content": "3+3"}, a("5")]}, "different prompts"),
    ({"chosen": [U, a("4")], "rejected": [U, {"role": "user", "content": "5"}]}, "must end with an assistant"),
    ({"prompt": "q", "ranked": ["only one"]}, "at least 2 responses"),
    ({"prompt": "q", "chosen": "4", "rejected": 5}, "'rejected' must be a non-empty list"),
    ({"prompt": "q", "chosen": "4", "rejected": "5", "margin": "big"}, "'margin' must be a number"),
    (["not", "a", "dict"], "must be a JSON object"),
])
def test_malformed_rows_name_file_row_and_field(row, says):
    with pytest.raises(UserError) as e:
        parse(row)
    assert "prefs.jsonl: row 7" in str(e.value) and says in str(e.value)


class CharTok:
    """A stand-in tokenizer: one id per character of a plain template."""

    pad_token_id = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role'][0]}>{m['content']}|" for m in messages)
        return text + ("<a>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_masks_only_the_answer_and_counts_drops():
    rows = [parse({"prompt": "2+2", "chosen": "4", "rejected": "5"}),
            parse({"prompt": "2+2", "chosen": "4" * 50, "rejected": "5"}),
            parse({"prompt": "2+2", "chosen": "4444x", "rejected": "4444y"})]
    # prompt "<u>2+2|<a>" is 10 characters; the answer "4|" 2
    ex, stats = tokenize(CharTok(), rows, max_seq_len=13, truncation="truncate")
    ids, mask = ex[0]["answers"][0]
    assert len(ids) == 12 and mask == [False] * 10 + [True] * 2
    # row 2: chosen truncated to 13 tokens; row 3: both cut to "<u>2+2|<a>444" -> identical, dropped
    assert stats["truncated_answers"] == 3 and stats["dropped_identical_after_truncation"] == 1
    assert len(ex) == 2
    ex, stats = tokenize(CharTok(), rows, max_seq_len=13, truncation="drop")
    assert stats["dropped_too_long"] == 2 and len(ex) == 1
