"""The assistant-token mask on a multi-turn chat, checked by hand on the character tokenizer."""

from __future__ import annotations

import pytest

from posttrain_cli.data.chat import apply_truncation, tokenize_chat
from posttrain_cli.errors import UserError
from posttrain_cli.models.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_multi_turn_mask_by_hand(tok):
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"},
    ]
    t = tokenize_chat(tok, msgs)
    pieces = tok.convert_ids_to_tokens(t.input_ids)
    # <s> <|system|> s </s> <|user|> 1 + 1 </s> <|assistant|> 2 </s> <|user|> 2 + 2 </s> <|assistant|> 4 </s>
    assert pieces == ["<s>", "<|system|>", "s", "</s>", "<|user|>", "1", "+", "1", "</s>", "<|assistant|>",
                      "2", "</s>", "<|user|>", "2", "+", "2", "</s>", "<|assistant|>", "4", "</s>"]
    trained = [p for p, m in zip(pieces, t.loss_mask) if m]
    # Both answers and the end-of-turn token after each; no prompt, role or system token.
    assert trained == ["2", "</s>", "4", "</s>"]
    assert [i for i, m in enumerate(t.loss_mask) if m] == [10, 11, 18, 19]


def test_prompt_completion_rows_are_single_turn(tok):
    from posttrain_cli.data.schemas import sft_messages

    msgs = sft_messages({"prompt": "ab", "completion": "cd"}, "f.jsonl", 1)
    t = tokenize_chat(tok, msgs)
    trained = [p for p, m in zip(tok.convert_ids_to_tokens(t.input_ids), t.loss_mask) if m]
    assert trained == ["c", "d", "</s>"]


def test_truncation_policies(tok):
    msgs = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "defgh"}]
    t = tokenize_chat(tok, msgs)  # 2 + 3 + 1 + 1 + 5 + 1 = 13 tokens
    assert len(t.input_ids) == 13
    assert apply_truncation(t, 13, "drop") is t
    assert apply_truncation(t, 10, "drop") is None
    cut = apply_truncation(t, 10, "truncate")
    assert cut.truncated and len(cut.input_ids) == 10 and sum(cut.loss_mask) == 3
    # Cut before the answer starts: nothing left to learn from, so the row is dropped.
    assert apply_truncation(t, 6, "truncate") is None


def test_template_that_is_not_prefix_stable_is_refused(tok):
    import copy

    bad = copy.deepcopy(tok)
    # Renders the turn count at the front: an earlier prefix is not a prefix of the whole.
    bad.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # Refused before it could train on a wrong mask (it also writes no end of turn).
    with pytest.raises(UserError, match="model.chat_template: the chat template (writes no end-of-turn|does not render)"):
        tokenize_chat(bad, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
