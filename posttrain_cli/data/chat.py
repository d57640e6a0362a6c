"""Chat templates: which template a model uses, and which tokens of a rendered chat carry loss.

    tokenizer.chat_template = template_text("tulu")            # model.chat_template: a name, a .jinja, inline
    examples = tokenize_conversation(tokenizer, messages, "each")   # SFT: one or more examples
    tok = tokenize_response(tokenizer, prompt, answer)          # preference / RM: prompt + one answer
    ids = prompt_ids(tokenizer, messages)                       # sampling: the generation prompt

What is trained is what the model generates at inference: an assistant turn is trained after the
text the template renders as its generation prompt (`add_generation_prompt=True` on the turns before
it), and the trained tokens are the rest of that turn, the end-of-turn tokens the template puts after
it included (that is how a model learns to stop).

Where the turns are found, in order:
- a template with `{% generation %}` markers: the marked text (the template author's own mask);
- otherwise character offsets: the conversation is rendered once, each turn's generation prompt and
  turn are rendered as prefixes of it, and the trained characters [len(prompt), len(turn)) are mapped
  to tokens through the fast tokenizer's offsets (a token crossing into the span counts, one crossing
  out of it into the next turn does not), so byte-level BPE merges across a turn boundary cannot
  shift the mask.

Templates that rewrite history (Qwen3 drops the reasoning of earlier turns and gives the last one a
think block; DeepSeek-R1 distills drop everything before `</think>`; OLMo 3 ends only the last turn
with EOS) are detected by the prefix test failing. `multi_turn` then decides:
- `each` (default): every assistant turn is trained in its own example, in the context the template
  gives it when that turn is generated, so a conversation with T answers becomes T examples (the log
  reports how many). A template that renders history unchanged needs one example for all turns.
- `last`: only the conversation's last assistant turn is trained (one example).
A template whose generation prompt prefills the answer (R1's `<think>\\n`) trains the message's
content after that prefill, with the template's own end-of-turn text after it, even where the template
would drop the reasoning from the rendered turn.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from posttrain_cli.errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "templates"
# Names model.chat_template takes (posttrain_cli/data/templates/<name>.jinja).
TEMPLATE_NAMES = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
MULTI_TURN = ("each", "last")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# An assistant content no template transforms: finds where a template puts a turn's content.
_PROBE = "q7Zk3Wv9PxJ2"


@dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool = False


# ------------------------------------------------------------------ which template

def template_text(value: str, where: str = "model.chat_template") -> str:
    """The template model.chat_template names: a shipped name, a .jinja file, or the template itself."""
    if value in TEMPLATE_NAMES:
        return (TEMPLATE_DIR / f"{value}.jinja").read_text()
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if value.endswith(".jinja") or path.is_file():
        if not path.is_file():
            raise UserError(f"{where}={value}: template file not found")
        return path.read_text()
    raise UserError(f"{where}={value}: not a shipped template ({', '.join(TEMPLATE_NAMES)}), a .jinja file "
                    f"or a Jinja template string")


def use_template(tokenizer, value: str | None, model: str):
    """Give the tokenizer model.chat_template (None: the model's own); a model with none is refused.
    The tokenizer is saved with every stage's model, so later stages and vLLM render the same text."""
    if value is not None:
        tokenizer.chat_template = template_text(value)
    elif not tokenizer.chat_template:
        raise UserError(f"model.chat_template: {model} has no chat template (a base model?); set "
                        f"model.chat_template to one of {', '.join(TEMPLATE_NAMES)}, a .jinja file or a "
                        f"template string")
    _turn_end(tokenizer)  # refuses a template whose turns cannot end on a token of this vocabulary
    return tokenizer


def _label(tokenizer) -> str:
    return f"the chat template of {tokenizer.name_or_path}" if tokenizer.name_or_path else "the chat template"


def _as_parts(messages: list[dict]) -> list[dict]:
    """String contents as one text part: multimodal templates (Idefics3, SmolVLM, LLaVA-NeXT) read
    content as a list of parts and render a plain string as nothing."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]


def _wants_parts(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return template is not None and getattr(tokenizer, "_posttrain_parts", None) == template


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text; a conversation it refuses (Gemma: no system role; roles that must
    alternate) is one line naming the key, which the data layer prefixes with file and row."""
    from jinja2.exceptions import TemplateError

    if _wants_parts(tokenizer):
        messages = _as_parts(messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise UserError(f"model.chat_template: {_label(tokenizer)} cannot render this conversation ({e})") from None


def _added_at(tokenizer, text: str) -> str | None:
    """The added (special) token `text` starts with, after whitespace; None if it starts otherwise."""
    text = text.lstrip()
    found = [t.content for t in tokenizer.added_tokens_decoder.values() if t.content and text.startswith(t.content)]
    return max(found, key=len) if found else None


def _turn_end(tokenizer) -> tuple[str, str]:
    """(end-of-turn token, closing text) of the tokenizer's template. Most templates write an
    end-of-turn token after an answer (closing ""); some end a turn with the next turn's header
    (GLM-4: <|user|>), which the template renders only when a turn follows: posttrain appends it
    (the closing) to a conversation's final answer, as those templates' training variants do."""
    cache = getattr(tokenizer, "_posttrain_turn_end", None)
    if cache is not None and cache[0] == tokenizer.chat_template:
        return cache[1]
    user = [{"role": "user", "content": "x"}]
    try:
        full = render(tokenizer, user + [{"role": "assistant", "content": _PROBE}])
        at = full.find(_PROBE)
    except Exception:  # noqa: BLE001 - a template that reads content as parts may fail on a string
        if _wants_parts(tokenizer):
            raise
        at = -1
    if at < 0 and not _wants_parts(tokenizer):
        try:
            tokenizer._posttrain_parts = tokenizer.chat_template
            full = render(tokenizer, user + [{"role": "assistant", "content": _PROBE}])
            at = full.find(_PROBE)
        except Exception:  # noqa: BLE001 - a template error in the parts form: it wants strings after all
            at = -1
        if at < 0:
            tokenizer._posttrain_parts = None
    if at < 0:
        raise UserError(f"model.chat_template: {_label(tokenizer)} does not render an assistant message's content; "
                        f"set model.chat_template ({', '.join(TEMPLATE_NAMES)})")
    after, closing = full[at + len(_PROBE):], ""
    token = _added_at(tokenizer, after)
    if token is None and not after.strip():
        nxt = render(tokenizer, user + [{"role": "assistant", "content": _PROBE}, {"role": "user", "content": _PROBE}])
        between = nxt[nxt.find(_PROBE) + len(_PROBE):nxt.rfind(_PROBE)]
        token = _added_at(tokenizer, between)
        if token is not None:
            closing = between[:between.find(token) + len(token)]
    if token is None:
        ends = (f"ends an assistant turn with {after.strip()!r}, which is not a token of its vocabulary"
                if after.strip() else "writes no end-of-turn token after an assistant turn")
        raise UserError(f"model.chat_template: {_label(tokenizer)} {ends}, so generation could not stop there; pick "
                        f"a template whose markers the vocabulary holds (model.chat_template: "
                        f"{', '.join(TEMPLATE_NAMES)})")
    tokenizer._posttrain_turn_end = (tokenizer.chat_template, (token, closing))
    return token, closing


def end_of_turn(tokenizer) -> list[int]:
    """The token that ends an assistant turn under this template (Llama 3: <|eot_id|>, ChatML:
    <|im_end|>, Tulu: EOS, GLM-4: <|user|>). Generation must stop there, so it goes into every
    sampler's stop set and the saved generation_config. A template whose end of turn is no single
    token of the vocabulary is refused."""
    return [tokenizer.convert_tokens_to_ids(_turn_end(tokenizer)[0])]


def _prepare(tokenizer) -> None:
    """The template's end of turn, and whether it reads content as parts, found before rendering."""
    if getattr(tokenizer, "chat_template", None):
        _turn_end(tokenizer)


def _render_turns(tokenizer, messages: list[dict]) -> str:
    """The rendered conversation, with the closing text after a final answer (_turn_end)."""
    text = render(tokenizer, messages)
    if messages[-1]["role"] == "assistant" and getattr(tokenizer, "chat_template", None):
        text += _turn_end(tokenizer)[1]
    return text


def stop_ids(tokenizer, generation_eos=None) -> list[int]:
    """Every token that ends a completion: the template's end of turn, the tokenizer's EOS and the
    model's generation_config eos_token_id (an int or a list)."""
    ids = end_of_turn(tokenizer) + [tokenizer.eos_token_id]
    ids += list(generation_eos) if isinstance(generation_eos, (list, tuple)) else [generation_eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


# ------------------------------------------------------------------ which tokens carry loss

def _encode(tokenizer, text: str, spans: list[tuple[int, int]]) -> Tokenized:
    """Tokenize text once; a token is trained when its characters overlap a span and end in it."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return _encode_pieces(tokenizer, text, spans)
    enc = backend.encode(text, add_special_tokens=False)
    ids = enc.ids
    mask = _span_mask(enc, len(ids), spans)
    return Tokenized(ids, mask if mask is not None else _offsets_mask(enc.offsets, spans))


def _span_mask(enc, n: int, spans: list[tuple[int, int]]) -> list[bool] | None:
    """The mask _offsets_mask computes, from a few lookups at each span's edges instead of every
    token's offsets (the per-token loop was a tenth of tokenizing a chat); None where a span edge is
    a character no token covers (a normalizer dropped it): _offsets_mask handles that."""
    mask, before = [False] * n, 0
    for s, e in spans:
        if e <= s:
            continue
        first, last = enc.char_to_token(s), enc.char_to_token(e - 1)
        if first is None or last is None:
            return None
        # Byte-level BPE splits a multi-byte character over tokens with the same offsets: widen to them.
        while first > 0 and enc.token_to_chars(first - 1)[1] > s:
            first -= 1
        # A token starting inside the span before crosses out of that one: not trained.
        while first <= last and enc.token_to_chars(first)[0] < before:
            first += 1
        before = e
        while last + 1 < n and enc.token_to_chars(last + 1)[0] < e:
            last += 1
        # Offsets only grow: tokens crossing out of the span are at its end.
        while last >= first and enc.token_to_chars(last)[1] > e:
            last -= 1
        mask[first:last + 1] = [True] * (last + 1 - first)
    return mask


def _offsets_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    mask, j = [False] * len(offsets), 0
    for t, (a, b) in enumerate(offsets):
        while j < len(spans) and a >= spans[j][1]:
            j += 1
        if j == len(spans):
            break
        # A token crossing into the answer is trained (it holds the answer's first characters); one
        # crossing out of it into the next turn is not (BPE may join a trailing space to "[INST").
        if b > spans[j][0] and a < spans[j][1] and b <= spans[j][1]:
            mask[t] = True
    return mask


def _encode_pieces(tokenizer, text: str, spans: list[tuple[int, int]]) -> Tokenized:
    """A tokenizer without character offsets (a slow one): the pieces between span edges are
    tokenized one by one, which is exact where no token would cross an edge."""
    ids, mask, at = [], [], 0
    for a, b in spans:
        for piece, trained in ((text[at:a], False), (text[a:b], True)):
            if piece:
                got = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += got
                mask += [trained] * len(got)
        at = b
    if text[at:]:
        got = tokenizer(text[at:], add_special_tokens=False)["input_ids"]
        ids += got
        mask += [False] * len(got)
    return Tokenized(ids, mask)


def _marked(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """A template with {% generation %} markers: the text and the character spans it marks."""
    from transformers.utils.chat_template_utils import render_jinja_template

    msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
    if _wants_parts(tokenizer):
        msgs = _as_parts(msgs)
    texts, spans = render_jinja_template([msgs], chat_template=tokenizer.chat_template,
                                         return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    return texts[0], list(spans[0])


def _turn_span(tokenizer, messages: list[dict], k: int, upto: str | None = None) -> tuple[str, tuple[int, int]]:
    """Turn k as it is generated: the text up to its end and the characters the model writes
    (`upto`: _render_turns of messages[:k + 1] where the caller has it)."""
    prompt = render(tokenizer, messages[:k], add_generation_prompt=True)
    upto = _render_turns(tokenizer, messages[: k + 1]) if upto is None else upto
    if upto.startswith(prompt) and len(upto) > len(prompt):
        return upto, (len(prompt), len(upto))
    # The rendered turn does not continue its generation prompt: the prompt prefills part of the
    # answer (R1: "<think>\n"; Nemotron 3: "<think>\n" where the turn renders "<think></think>").
    content = messages[k].get("content") or ""
    same = len(os.path.commonprefix([prompt, upto]))
    if content.strip() and content.strip() in upto[same:]:
        # The template keeps the content: the model writes the rest of the rendered turn, less
        # what the prompt prefilled.
        written = _after_prefill(upto[same:], prompt[same:])
    else:
        # The template rewrites the content (R1 drops everything before </think>): the model writes
        # the message's content after the prefill, then the template's end-of-turn text.
        probe = _render_turns(tokenizer, messages[:k] + [{**messages[k], "content": _PROBE}])
        at = probe.find(_PROBE)
        if at < 0 or not prompt.startswith(probe[:at]):
            raise UserError(f"model.chat_template: {_label(tokenizer)} does not render assistant turns after its "
                            f"generation prompt, so posttrain cannot tell which tokens the model writes; set "
                            f"model.chat_template to a template that does ({', '.join(TEMPLATE_NAMES)}, or one "
                            f"with {{% generation %}} markers)")
        written = _after_prefill(content, prompt[at:]) + probe[at + len(_PROBE):]
    return prompt + written, (len(prompt), len(prompt) + len(written))


def _after_prefill(text: str, prefill: str) -> str:
    """text without the prefill the generation prompt already wrote at its start."""
    if prefill and text.startswith(prefill):
        return text[len(prefill):]
    if prefill.strip() and text.lstrip().startswith(prefill.strip()):
        return text.lstrip()[len(prefill.strip()):].lstrip("\n")
    return text


def tokenize_conversation(tokenizer, messages: list[dict], multi_turn: str = "each") -> list[Tokenized]:
    """One SFT conversation -> its training examples (module docstring: which turns, in which context)."""
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        return []
    _prepare(tokenizer)
    marked = bool(_GENERATION_TAG.search(getattr(tokenizer, "chat_template", None) or ""))
    full = _render_turns(tokenizer, messages)
    each = {k: _turn_span(tokenizer, messages, k, full if k == len(messages) - 1 else None) for k in turns}
    # One example holds every turn when each turn, rendered as the last one, is a prefix of the whole.
    spans = [span for text, span in each.values()] if all(full.startswith(t) for t, _ in each.values()) else None
    if spans is not None:
        if marked:
            full, spans = _marked(tokenizer, messages)
        return [_encode(tokenizer, full, spans[-1:] if multi_turn == "last" else spans)]
    out = []
    for k in (turns[-1:] if multi_turn == "last" else turns):
        if marked:
            text, marks = _marked(tokenizer, messages[: k + 1])
            out.append(_encode(tokenizer, text, marks[-1:]))
        else:
            text, span = each[k]
            out.append(_encode(tokenizer, text, [span]))
    return out


def tokenize_chat(tokenizer, messages: list[dict]) -> Tokenized:
    """The single example of a conversation whose template renders history unchanged (tests, benchmarks)."""
    examples = tokenize_conversation(tokenizer, messages, "each")
    if len(examples) != 1:
        raise UserError(f"{_label(tokenizer)} rewrites earlier turns: this conversation "
                        f"is {len(examples)} examples (tokenize_conversation)")
    return examples[0]


def apply_truncation(tok: Tokenized, max_len: int, policy: str) -> Tokenized | None:
    """Keep the first max_len tokens (truncate) or drop the row; None means dropped."""
    if len(tok.input_ids) <= max_len:
        return tok
    if policy == "drop":
        return None
    cut = Tokenized(tok.input_ids[:max_len], tok.loss_mask[:max_len], truncated=True)
    return cut if any(cut.loss_mask) else None


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens a sampler starts from: the conversation and the template's generation prompt."""
    _prepare(tokenizer)
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def tokenize_response(tokenizer, prompt: list[dict], response: dict) -> Tokenized:
    """prompt + one assistant answer; the mask marks only that answer (and its end-of-turn tokens)."""
    _prepare(tokenizer)
    messages = prompt + [response]
    k = len(prompt)
    if _GENERATION_TAG.search(getattr(tokenizer, "chat_template", None) or ""):
        text, marks = _marked(tokenizer, messages)
        return _encode(tokenizer, text, marks[-1:])
    text, span = _turn_span(tokenizer, messages, k)
    return _encode(tokenizer, text, [span])
