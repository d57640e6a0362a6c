"""Rows exactly as the public datasets ship them load: extra fields, tool calls, text parts, nulls.
Images are refused by name; role and content stay strict."""

from __future__ import annotations

import pytest

from posttrain_cli.data.schemas import preference_row, prompt_row, sft_messages
from posttrain_cli.errors import UserError

U = {"role": "user", "content": "What is 2+2?"}
A = {"role": "assistant", "content": "4"}


def test_tulu3_sft_mixture_row():
    row = {"id": "ai2-adapt-dev/oasst1_converted_1", "messages": [U, A], "source": "ai2-adapt-dev/oasst1_converted"}
    assert sft_messages(row, "tulu.parquet", 1) == [U, A]


def test_tulu3_preference_mixture_row():
    row = {"id": "p1", "source": "ultrafeedback", "prompt": U["content"],
           "chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "5"}],
           "chosen_rating": 5.0, "rejected_rating": 1.0, "chosen_model": "m1", "rejected_model": "m2"}
    r = preference_row(row, "prefs.parquet", 3)
    assert r["prompt"] == [U] and [x["content"] for x in r["responses"]] == ["4", "5"] and r["margin"] is None


def test_rlvr_gsm_math_if_row_keeps_its_fields():
    row = {"messages": [U], "ground_truth": "4", "dataset": "gsm8k", "constraint_type": None, "constraint": None}
    r = prompt_row(row, "rlvr.parquet", 9)
    assert r["messages"] == [U] and r["ground_truth"] == "4" and r["dataset"] == "gsm8k"
    ifrow = {"messages": [U], "ground_truth": '{"func_name": "validate_lowercase"}', "dataset": "ifeval",
             "constraint_type": "Change Cases", "constraint": "Your entire response should be in lowercase."}
    r = prompt_row(ifrow, "rlvr.parquet", 10)
    assert r["constraint_type"] == "Change Cases" and r["dataset"] == "ifeval"


def test_tool_calls_and_reasoning_keys_are_kept_for_the_template():
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    msgs = [U,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "4", "name": "add", "tool_call_id": "c1"},
            {"role": "assistant", "content": "It is 4.", "reasoning_content": "2+2=4"}]
    out = sft_messages({"messages": msgs}, "tools.jsonl", 1)
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert out[2] == {"role": "tool", "content": "4", "name": "add", "tool_call_id": "c1"}
    assert out[3]["reasoning_content"] == "2+2=4"


def test_null_keys_arrow_fills_in_are_absent():
    """A parquet file's message structs carry every key of every row, null where a row had none."""
    msgs = [{"role": "user", "content": "q", "tool_calls": None, "name": None},
            {"role": "assistant", "content": "a", "tool_calls": None, "name": None}]
    assert sft_messages({"messages": msgs, "images": None}, "x.parquet", 1) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    # a null prompt next to full conversations is no prompt at all
    assert preference_row({"prompt": None, "chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "5"}],
                           "margin": None}, "p.parquet", 1)["prompt"] == [U]


def test_text_parts_are_joined_and_an_empty_images_column_is_fine():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "4", "image": None}]}]
    assert sft_messages({"messages": msgs, "images": []}, "mm.jsonl", 2) == [U, A]


@pytest.mark.parametrize("row, says", [
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this?"}]}, A]},
     "field 'messages[0].content[0]' is a 'image' part"),
    ({"messages": [U, A], "images": ["img0.png"]}, "field 'images' holds 1 image(s)"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}, A]},
     "field 'messages[0].content[0].text' must be a string"),
    ({"messages": [{"role": "human", "content": "hi"}, A]}, "field 'messages[0].role'='human'"),
    ({"messages": [U, {"role": "assistant", "content": None}]}, "field 'messages[1].content' must be a string"),
    ({"messages": [U, {"role": "assistant", "content": 4}]}, "field 'messages[1].content' must be a string"),
    ({"messages": [U, {"role": "assistant", "content": "", "tool_calls": "add(2, 2)"}]},
     "field 'messages[1].tool_calls' must be a list"),
])
def test_bad_rows_name_file_row_and_field(row, says):
    with pytest.raises(UserError) as e:
        sft_messages(row, "data.jsonl", 12)
    assert str(e.value).startswith("data.jsonl: row 12: ") and says in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_images_are_refused_in_every_row_schema():
    with pytest.raises(UserError, match="p.jsonl: row 1: field 'images'"):
        preference_row({"prompt": "q", "chosen": "a", "rejected": "b", "images": ["x"]}, "p.jsonl", 1)
    with pytest.raises(UserError, match="r.jsonl: row 2: field 'messages\\[0\\].content\\[0\\]' is a 'image_url' part"):
        prompt_row({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
                    "ground_truth": "1"}, "r.jsonl", 2)
