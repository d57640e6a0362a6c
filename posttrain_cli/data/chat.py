"""Chat-template rendering and the assistant-token mask.

The mask marks every assistant turn's tokens, the end-of-turn tokens the
template puts after them included (that is how a model learns to stop). Turn
boundaries come from rendering prefixes of the conversation with the model's
own template, so any Hugging Face chat template works, not only ours.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain_cli.errors import UserError


@dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool = False


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat(tokenizer, messages: list[dict]) -> Tokenized:
    full = _ids(tokenizer, render(tokenizer, messages))
    mask = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _ids(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True))
        upto = _ids(tokenizer, render(tokenizer, messages[: i + 1]))
        start = len(before)
        if full[: len(upto)] != upto or full[:start] != before:
            raise UserError(
                "the chat template does not render conversations prefix by prefix; "
                "posttrain cannot find assistant turns with it (set a different tokenizer chat template)"
            )
        end = len(upto)
        # Templates that drop content from earlier turns (e.g. reasoning) end
        # the last turn exactly at the end of the conversation.
        for t in range(start, end):
            mask[t] = True
    return Tokenized(full, mask)


def tokenize_conversation(tokenizer, messages: list[dict], multi_turn: str = "each") -> list[Tokenized]:
    """One SFT conversation -> its training examples (several when the template rewrites history)."""
    return [tokenize_chat(tokenizer, messages)]


def apply_truncation(tok: Tokenized, max_len: int, policy: str) -> Tokenized | None:
    """Keep the first max_len tokens (truncate) or drop the row; None means dropped."""
    if len(tok.input_ids) <= max_len:
        return tok
    if policy == "drop":
        return None
    cut = Tokenized(tok.input_ids[:max_len], tok.loss_mask[:max_len], truncated=True)
    return cut if any(cut.loss_mask) else None


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return _ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def tokenize_response(tokenizer, prompt: list[dict], response: dict) -> Tokenized:
    """prompt + one assistant answer; the mask marks only that answer (and its end-of-turn tokens)."""
    before = _ids(tokenizer, render(tokenizer, prompt, add_generation_prompt=True))
    full = _ids(tokenizer, render(tokenizer, prompt + [response]))
    if full[: len(before)] != before or len(full) == len(before):
        raise UserError(
            "the chat template does not render conversations prefix by prefix; "
            "posttrain cannot find the answer with it (set a different tokenizer chat template)"
        )
    return Tokenized(full, [False] * len(before) + [True] * (len(full) - len(before)))
