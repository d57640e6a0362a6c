"""The assistant mask on the chat templates real checkpoints ship, against the templates' own
training variants: every template in the installed `trl` package with a `*_training.jinja` twin
(read from the package at test time), rendered through real vocabularies (tests/fixtures).

The twin marks what its author wants trained with {% generation %}. posttrain trains what the model
writes after the original template's generation prompt (data/chat.py), so per assistant turn the
trained text equals the twin's marked text less the part of the generation prompt the twin puts
inside its marks: Qwen 2.5 marks the newline after `<|im_start|>assistant`, R1 distills mark
`<｜Assistant｜><think>\\n`, which `add_generation_prompt=True` renders (the model never writes them).
Where the original template renders history differently from its twin (Qwen3 drops earlier
reasoning, R1 drops everything before </think>), posttrain trains each turn in its own example, in
the context the original gives it at generation time; the trained text is still the twin's.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from posttrain_cli.data.chat import (_as_parts, _wants_parts, end_of_turn, render, stop_ids, tokenize_conversation,
                                     tokenize_response)
from tests.fixtures.real import tokenizer, trl_template

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 12 + 30?"},
               {"role": "assistant", "content": "12 + 30 = 42. The answer is 42."}],
    "system": [{"role": "system", "content": "You are a terse assistant."},
               {"role": "user", "content": "Say hello."},
               {"role": "assistant", "content": "Hello there!"}],
    "multi": [{"role": "user", "content": "Hi!"},
              {"role": "assistant", "content": "Hello, how can I help?"},
              {"role": "user", "content": "Add 2 and 3."},
              {"role": "assistant", "content": " 2 + 3 = 5"}],
    "reasoning": [{"role": "user", "content": "Is 7 prime?"},
                  {"role": "assistant", "content": "<think>\nIt has no divisor but 1 and 7.\n</think>\n\nYes, 7 is prime."},
                  {"role": "user", "content": "And 9?"},
                  {"role": "assistant", "content": "<think>\n9 = 3 x 3.\n</think>\n\nNo: 9 = 3 x 3."}],
}

# template -> (vocabulary family, twin). The issue names these; every other twin in the installed
# trl package is checked too (ALL below), on the Qwen2 vocabulary with its markers added.
KNOWN = {
    "qwen2_5": ("qwen2", "qwen2_5_training"),
    "qwen3": ("qwen2", "qwen3_training"),
    "llama3": ("llama3", "llama3_training"),
    "llama3_1": ("llama3", "llama3_training"),
    "llama3_2": ("llama3", "llama3_training"),
    "deepseek_r1_distill": ("r1_distill", "deepseek_r1_distill_training"),
    "gemma3": ("gemma", "gemma3_training"),
}


def _trl_dir() -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates"


def _all_twins() -> list[str]:
    return sorted(p.name.removesuffix("_training.jinja") for p in _trl_dir().glob("*_training.jinja")
                  if (_trl_dir() / p.name.replace("_training", "")).is_file())


@functools.lru_cache(maxsize=None)
def _shared(family: str):
    """One tokenizer per family for the tests that only set its template (building one from the
    fixture takes about a second)."""
    if family != "gemma":
        return tokenizer(family)
    # Gemma's own SentencePiece vocabulary is not among the fixtures: the Qwen2 BPE with Gemma's markers.
    tok = tokenizer("qwen2")
    tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>",
                            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def _tok(family: str, template: str):
    tok = _shared(family)
    tok.chat_template = template
    return tok


def _runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The masked token runs (one per trained assistant turn)."""
    runs, cur = [], None
    for i, m in zip(ids, mask):
        if m:
            if cur is None:
                cur = []
                runs.append(cur)
            cur.append(i)
        else:
            cur = None
    return runs


def _cue(tok, messages: list[dict], k: int, before_span: str) -> str:
    """What the original's generation prompt for turn k adds that the twin has not rendered yet
    before its marks (the part of the prompt the twin marks as trained)."""
    head = render(tok, messages[:k])
    prompt = render(tok, messages[:k], add_generation_prompt=True)
    added = prompt[len(head):] if prompt.startswith(head) else prompt
    j = max(j for j in range(len(added) + 1) if before_span.endswith(added[:j]))
    return added[j:]


def _twin_runs(tok, twin: str, original: str, messages: list[dict]) -> list[list[int]]:
    """The twin's marked tokens per assistant turn of `messages`, less the tokens that lie wholly
    inside the generation prompt's part (a token that crosses into the answer stays, as in ours)."""
    parts = _wants_parts(tok)
    tok.chat_template = twin
    shown = _as_parts(messages) if parts else messages
    out = tok.apply_chat_template(shown, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    text = tok.apply_chat_template(shown, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    tok.chat_template = original
    if parts:
        tok._posttrain_parts = original
    offsets = enc["offset_mapping"]
    asst = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    runs, t = [], 0
    while t < len(ids):
        if not mask[t]:
            t += 1
            continue
        start = t
        while t < len(ids) and mask[t]:
            t += 1
        a = offsets[start][0]
        cue = _cue(tok, messages, asst[len(runs)], text[:a])
        n = 0
        while n < len(cue) and a + n < len(text) and text[a + n] == cue[n]:
            n += 1
        runs.append([ids[i] for i in range(start, t) if offsets[i][1] > a + n])
    return runs


def _ours_and_theirs(tok, original: str, twin: str, messages: list[dict]):
    """(our trained runs, the twin's) per assistant turn. Where posttrain trains turn by turn (the
    original rewrites history), each turn is compared with the twin's last turn of the conversation
    up to it: the twin's mark of that turn as the one being generated."""
    examples = tokenize_conversation(tok, messages, "each")
    ours = [run for ex in examples for run in _runs(ex.input_ids, ex.loss_mask)]
    if len(examples) == 1:
        theirs = _twin_runs(tok, twin, original, messages)
    else:
        asst = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        theirs = [_twin_runs(tok, twin, original, messages[: k + 1])[-1] for k in asst]
    return examples, [tok.decode(r) for r in ours], [tok.decode(r) for r in theirs]


def _check(name: str, family: str, twin_name: str, conv: str):
    original, twin = trl_template(name), trl_template(twin_name)
    tok = _tok(family, original)
    messages = CONVERSATIONS[conv]
    try:
        tok.apply_chat_template(messages, tokenize=False)
        tok.chat_template = twin
        tok.apply_chat_template(messages, tokenize=False)
        tok.chat_template = original
    except Exception as e:  # noqa: BLE001 - a template that cannot render this conversation at all
        pytest.skip(f"{name} does not render the {conv} conversation: {e}")
    examples, ours, theirs = _ours_and_theirs(tok, original, twin, messages)
    assert ours == theirs
    # Each trained turn ends with the template's end of turn (a single token of the vocabulary).
    eot = end_of_turn(tok)
    for ex in examples:
        for run in _runs(ex.input_ids, ex.loss_mask):
            assert eot[0] in run
    return tok, examples


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(KNOWN))
def test_mask_equals_the_training_twin(name, conv):
    family, twin = KNOWN[name]
    tok, examples = _check(name, family, twin, conv)
    history_rewritten = name in ("qwen3", "deepseek_r1_distill") and conv in ("multi", "reasoning")
    assert len(examples) == (2 if history_rewritten else 1)


def test_identical_renders_give_identical_token_masks():
    """Where the original renders exactly the twin's text and the twin marks nothing of the
    generation prompt (Llama 3, Gemma 3, Qwen3 single turn), the masks agree token for token."""
    for name, family, twin_name, conv in [("llama3", "llama3", "llama3_training", "multi"),
                                          ("gemma3", "gemma", "gemma3_training", "multi"),
                                          ("qwen3", "qwen2", "qwen3_training", "single")]:
        tok = _tok(family, trl_template(twin_name))
        messages = CONVERSATIONS[conv]
        twin = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        tok.chat_template = trl_template(name)
        (ours,) = tokenize_conversation(tok, messages)
        assert ours.input_ids == twin["input_ids"], name
        assert ours.loss_mask == [bool(m) for m in twin["assistant_masks"]], name


@pytest.mark.parametrize("name", [n for n in _all_twins() if n not in KNOWN] if _trl_dir().is_dir() else [])
def test_every_trl_twin(name):
    """Every other template trl ships with a training twin, on the Qwen2 vocabulary with the
    template's markers added as special tokens."""
    original = trl_template(name)
    tok = _generic()
    tok.chat_template = original
    cannot = []
    for conv in ("single", "system", "multi"):
        try:
            _check_generic(tok, name, conv)
        except _CannotRender as e:
            cannot.append(str(e))
    if len(cannot) == 3:
        pytest.skip("; ".join(cannot))


@functools.lru_cache(maxsize=None)
def _generic():
    """The Qwen2 vocabulary with every marker of every trl template added as a special token."""
    markers = set()
    for name in _all_twins():
        markers |= set(re.findall(r"<[|｜][^<>'\"\s]{1,40}?[|｜]>|<[|｜]?[a-z_]{2,30}[|｜]>|<(?:start|end)_of_turn>|<end_of_utterance>|</s>",
                                  trl_template(name)))
    tok = tokenizer("qwen2")
    tok.add_special_tokens({"additional_special_tokens": sorted(markers)})
    return tok


class _CannotRender(Exception):
    pass


def _check_generic(tok, name, conv):
    original, twin = trl_template(name), trl_template(name + "_training")
    messages = CONVERSATIONS[conv]
    end_of_turn(tok)  # finds whether the template reads content as parts (Idefics3, SmolVLM, LLaVA-NeXT)
    shown = _as_parts(messages) if _wants_parts(tok) else messages
    try:
        tok.chat_template = twin
        tok.apply_chat_template(shown, tokenize=False)
        tok.chat_template = original
        tok.apply_chat_template(shown, tokenize=False)
    except Exception as e:  # noqa: BLE001
        tok.chat_template = original
        raise _CannotRender(f"{name} does not render the {conv} conversation: {str(e)[:120]}")
    if shown is not messages:
        tok._posttrain_parts = original
    _, ours, theirs = _ours_and_theirs(tok, original, twin, messages)
    if name == "llava_next":
        # The original writes '</s> ' and the twin leaves the space after </s> unmarked; posttrain
        # trains the rendered turn to its end (as the Qwen twins mark '<|im_end|>\n'). Generation
        # stops at </s> either way.
        ours = [o.removesuffix(" ") for o in ours]
    assert ours == theirs, (name, conv)


def test_last_turn_only():
    tok = _tok("qwen2", trl_template("qwen2_5"))
    (ex,) = tokenize_conversation(tok, CONVERSATIONS["multi"], "last")
    assert [tok.decode(r) for r in _runs(ex.input_ids, ex.loss_mask)] == [" 2 + 3 = 5<|im_end|>\n"]
    tok = _tok("qwen2", trl_template("qwen3"))
    (ex,) = tokenize_conversation(tok, CONVERSATIONS["reasoning"], "last")
    text = tok.decode(ex.input_ids)
    # The earlier turn's reasoning is gone from the context, as at inference; the last one is trained with its own.
    assert "no divisor" not in text and "<think>\n9 = 3 x 3.\n</think>\n\nNo: 9 = 3 x 3.<|im_end|>" in text


def test_response_mask_on_a_rewriting_template():
    """DPO / reward-model rows: the answer after its generation prompt, reasoning kept (R1 drops it)."""
    tok = _tok("r1_distill", trl_template("deepseek_r1_distill"))
    prompt = CONVERSATIONS["reasoning"][:1]
    t = tokenize_response(tok, prompt, CONVERSATIONS["reasoning"][1])
    assert [tok.decode(r) for r in _runs(t.input_ids, t.loss_mask)] == [
        "It has no divisor but 1 and 7.\n</think>\n\nYes, 7 is prime.<｜end▁of▁sentence｜>"]
    assert tok.decode(t.input_ids).startswith("<｜begin▁of▁sentence｜><｜User｜>Is 7 prime?<｜Assistant｜><think>\n")


@pytest.mark.parametrize("family,template,eot", [("qwen2", "qwen3", "<|im_end|>"), ("llama3", "llama3_1", "<|eot_id|>"),
                                                  ("r1_distill", "deepseek_r1_distill", "<｜end▁of▁sentence｜>")])
def test_stop_set_holds_the_end_of_turn(family, template, eot):
    tok = _tok(family, trl_template(template))
    eot_id = tok.convert_tokens_to_ids(eot)
    assert end_of_turn(tok) == [eot_id]
    stops = stop_ids(tok, None)
    assert stops[0] == eot_id and tok.eos_token_id in stops


def test_content_the_template_drops_is_refused():
    """A template that renders no assistant content at all (as string or as parts) is refused in one
    line naming the key, not trained on an empty mask."""
    from posttrain_cli.data.chat import use_template
    from posttrain_cli.errors import UserError

    tok = tokenizer("qwen2", "{% for m in messages %}{{ m['role'] }}<|im_end|>{% endfor %}")
    with pytest.raises(UserError, match="model.chat_template: .*does not render an assistant message's content"):
        use_template(tok, None, "my-vlm")


def test_base_model_without_template_is_refused_naming_the_key():
    from posttrain_cli.data.chat import use_template
    from posttrain_cli.errors import UserError

    with pytest.raises(UserError, match=r"model.chat_template: /models/llama-base has no chat template .*tulu"):
        use_template(tokenizer("llama3"), None, "/models/llama-base")
    # Given one, it renders with it (and the end of turn is Tulu's EOS).
    tok = use_template(tokenizer("llama3"), "tulu", "/models/llama-base")
    assert end_of_turn(tok) == [tok.convert_tokens_to_ids("<|end_of_text|>")]


def test_template_names_files_and_inline(tmp_path):
    from posttrain_cli.data.chat import TEMPLATE_NAMES, template_text
    from posttrain_cli.errors import UserError

    assert {"tulu", "chatml", "llama3"} <= set(TEMPLATE_NAMES)
    assert "<|assistant|>" in template_text("tulu")
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert template_text(str(f)) == f.read_text()
    assert template_text("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    with pytest.raises(UserError, match="model.chat_template=nope.jinja: template file not found"):
        template_text("nope.jinja")
    with pytest.raises(UserError, match="model.chat_template=tullu: not a shipped template"):
        template_text("tullu")


@pytest.mark.parametrize("name,family,eot", [("tulu", "olmo2", "<|endoftext|>"), ("tulu", "llama3", "<|end_of_text|>"),
                                             ("llama3", "llama3", "<|eot_id|>"), ("chatml", "qwen2", "<|im_end|>")])
def test_shipped_templates_on_real_vocabularies(name, family, eot):
    """posttrain's own templates, by hand: OLMo 2 / Tulu 3, Llama 3, ChatML on their vocabularies."""
    from posttrain_cli.data.chat import use_template

    tok = use_template(_shared(family), name, family)
    examples = tokenize_conversation(tok, CONVERSATIONS["multi"])
    assert len(examples) == 1
    trained = [tok.decode(r) for r in _runs(examples[0].input_ids, examples[0].loss_mask)]
    answers = ["Hello, how can I help?", "2 + 3 = 5" if name == "llama3" else " 2 + 3 = 5"]
    tail = {"tulu": eot, "llama3": eot, "chatml": eot + "\n"}[name]
    assert trained == [a + tail for a in answers]
    assert end_of_turn(tok) == [tok.convert_tokens_to_ids(eot)]


def test_tulu_matches_a_marked_twin():
    """OLMo 2 / Tulu has no twin in trl: posttrain's tulu template with {% generation %} marks
    around what Tulu trains (the answer and EOS, not the newline before the next turn)."""
    from posttrain_cli.data.chat import template_text

    marked = (template_text("tulu")
              .replace("{{ '<|assistant|>\\n' + message['content'] + eos_token }}",
                       "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"))
    assert "generation" in marked
    tok = _tok("olmo2", template_text("tulu"))
    for conv in CONVERSATIONS:
        _, ours, theirs = _ours_and_theirs(tok, template_text("tulu"), marked, CONVERSATIONS[conv])
        assert ours == theirs


def test_a_bpe_merge_across_the_turn_boundary():
    """A template with no special token between prompt and answer: the prompt ends with a newline
    and the answer starts with one, and byte-level BPE makes one token of the two. Offsets still
    find the answer (the crossing token is trained: it holds the answer's first character), where
    tokenizing prefixes would have disagreed with the whole."""
    template = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    tok = _tok("qwen2", template)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nHello"}]
    prompt = tok("user:\nhi\nassistant:\n", add_special_tokens=False)["input_ids"]
    (ex,) = tokenize_conversation(tok, msgs)
    assert ex.input_ids[: len(prompt)] != prompt          # the merge crossed the boundary
    trained = [tok.decode([i]) for i, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert "".join(trained) == ":\n\nHello<|im_end|>\n"   # the crossing ":\n\n" and the rest
    assert trained[0] == ":\n\n" and not any(ex.loss_mask[: ex.loss_mask.index(True)])


def test_olmo3_and_llama2_templates_by_hand():
    """olmo3 ends only the final answer with EOS (history uses <|im_end|>): each answer is trained as
    the final one, ending with EOS; Llama 2-Chat trains ' answer </s>' after '[/INST]'."""
    from posttrain_cli.data.chat import use_template

    tok = use_template(_shared("olmo2"), "olmo3", "olmo2")
    examples = tokenize_conversation(tok, CONVERSATIONS["multi"])
    assert [[tok.decode(r) for r in _runs(e.input_ids, e.loss_mask)] for e in examples] == [
        ["Hello, how can I help?<|endoftext|>"], [" 2 + 3 = 5<|endoftext|>"]]
    # The second example's context renders the first answer as history does (<|im_end|>), untrained.
    assert "Hello, how can I help?<|im_end|>\n<|im_start|>user\nAdd 2 and 3." in tok.decode(examples[1].input_ids)
    assert len(tokenize_conversation(tok, CONVERSATIONS["multi"], "last")) == 1

    tok = use_template(_shared("llama3"), "llama2", "llama3")
    (ex,) = tokenize_conversation(tok, CONVERSATIONS["system"])
    assert tok.decode(ex.input_ids) == ("<|begin_of_text|>[INST] <<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\n"
                                       "Say hello. [/INST] Hello there! <|end_of_text|>")
    assert [tok.decode(r) for r in _runs(ex.input_ids, ex.loss_mask)] == [" Hello there! <|end_of_text|>"]


def test_a_conversation_the_template_refuses_is_one_line():
    """Gemma's template refuses a system turn: a UserError naming the key (the data layer adds the
    file and row), not a Jinja traceback."""
    from posttrain_cli.errors import UserError

    tok = _tok("gemma", trl_template("gemma"))
    with pytest.raises(UserError, match=r"model.chat_template: .*cannot render this conversation \(System role"):
        tokenize_conversation(tok, CONVERSATIONS["system"])
