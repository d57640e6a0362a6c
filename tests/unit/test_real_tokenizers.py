"""The real-tokenizer fixtures (tests/fixtures/real.py) behave like the real tokenizers: the vocabularies
load with their specials at the real ids, text round-trips, the pre-tokenizers split as the real ones
do (ids checked against the vocabulary files themselves), the shipped chat templates render with
single-token specials, and a tiny model of every architecture builds, reloads and runs a forward.

Expected ids are read from the stored vocabulary (vocab.json, tokenizer.json), not hard-coded from
memory: "Hello world" is ["Hello", "Ġworld"] in every byte-level BPE here ("Ġ" is the space byte)."""

from __future__ import annotations

import json
import lzma

import pytest
import regex

from tests.fixtures.real import ARCHS, FAMILIES, FIXTURES, OLMO2_TULU_TEMPLATE, build_model, tokenizer, trl_template

ROUND_TRIP = ["Hello world", "  two leading spaces, trailing tab\t", "line\n\nbreaks\r\n", "12345678 + 0.25 = ?",
              "Grüße aus Köln — naïve café", "東京タワーは高い。", "emoji 🤖👍🏽 and ﬁ ligature", "don't WON'T I'm",
              "def f(x):\n    return x ** 2\n"]


def vocab(family: str) -> dict[str, int]:
    """The base vocabulary as stored (before any added token)."""
    if family in ("qwen2", "r1_distill"):
        return json.loads(lzma.decompress((FIXTURES / "qwen2_vocab.json.xz").read_bytes()))
    name = {"llama3": "llama3_tokenizer.json.xz", "olmo2": "olmo2_dolma2.json.xz"}[family]
    return json.loads(lzma.decompress((FIXTURES / name).read_bytes()))["model"]["vocab"]


@pytest.fixture(scope="module")
def toks():
    return {family: tokenizer(family) for family in FAMILIES}


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family, size, bos, eos, pad", [
    ("qwen2", 151669, None, "<|endoftext|>", "<|endoftext|>"),
    ("r1_distill", 151665, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("llama3", 128256, "<|begin_of_text|>", "<|end_of_text|>", None),
    ("olmo2", 100278, "<|endoftext|>", "<|endoftext|>", "<|pad|>"),
])
def test_family_has_the_real_size_and_bos_eos_pad(toks, family, size, bos, eos, pad):
    tok = toks[family]
    assert len(tok) == size
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)


@pytest.mark.parametrize("family, token, id_", [
    ("qwen2", "<|endoftext|>", 151643), ("qwen2", "<|im_start|>", 151644), ("qwen2", "<|im_end|>", 151645),
    ("qwen2", "<think>", 151667), ("qwen2", "</think>", 151668),
    ("r1_distill", "<｜end▁of▁sentence｜>", 151643), ("r1_distill", "<｜User｜>", 151644),
    ("r1_distill", "<｜Assistant｜>", 151645), ("r1_distill", "<｜begin▁of▁sentence｜>", 151646),
    ("r1_distill", "<think>", 151648), ("r1_distill", "</think>", 151649),
    ("llama3", "<|begin_of_text|>", 128000), ("llama3", "<|end_of_text|>", 128001),
    ("llama3", "<|finetune_right_pad_id|>", 128004), ("llama3", "<|start_header_id|>", 128006),
    ("llama3", "<|end_header_id|>", 128007), ("llama3", "<|eom_id|>", 128008), ("llama3", "<|eot_id|>", 128009),
    ("llama3", "<|python_tag|>", 128010), ("llama3", "<|reserved_special_token_247|>", 128255),
    ("olmo2", "<|endoftext|>", 100257), ("olmo2", "<|im_start|>", 100264), ("olmo2", "<|im_end|>", 100265),
    ("olmo2", "<|pad|>", 100277),
])
def test_specials_are_single_tokens_at_their_real_ids(toks, family, token, id_):
    tok = toks[family]
    assert ids(tok, f"a{token}b") == ids(tok, "a") + [id_] + ids(tok, "b")
    assert tok.convert_ids_to_tokens(id_) == token


def test_think_tags_are_added_but_not_special(toks):
    """Qwen3 marks <think> non-special: decoding with skip_special_tokens keeps the reasoning tags
    (as the real tokenizer does) but drops <|im_end|>."""
    tok = toks["qwen2"]
    text = "<think>\nhm\n</think>\n\n42<|im_end|>"
    assert tok.decode(ids(tok, text), skip_special_tokens=True) == "<think>\nhm\n</think>\n\n42"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_round_trips(toks, family):
    tok = toks[family]
    for text in ROUND_TRIP:
        assert tok.decode(ids(tok, text)) == text, text
        assert tok.unk_token_id not in ids(tok, text) or tok.unk_token_id == tok.eos_token_id


@pytest.mark.parametrize("family", list(FAMILIES))
def test_byte_level_pretokenizer_merges_a_space_into_the_next_word(toks, family):
    v = vocab(family)
    tok = toks[family]
    assert ids(tok, "Hello world") == [v["Hello"], v["Ġworld"]]
    # Two newlines are one token ("ĊĊ"), two spaces before a word are " " + " word".
    assert ids(tok, "a\n\nb") == [v["a"], v["ĊĊ"], v["b"]]
    assert ids(tok, "a  b") == [v["a"], v["Ġ"], v["Ġb"]]


def test_digits_split_as_each_family_splits_them(toks):
    """Qwen2 splits numbers into single digits; Llama 3 and OLMo 2 (cl100k) into runs of three."""
    q, l3, o2 = vocab("qwen2"), vocab("llama3"), vocab("olmo2")
    assert ids(toks["qwen2"], "12345") == [q[d] for d in "12345"]
    assert ids(toks["llama3"], "12345") == [l3["123"], l3["45"]]
    assert ids(toks["olmo2"], "12345") == [o2["123"], o2["45"]]


def test_bos_is_added_where_the_real_tokenizer_adds_it(toks):
    assert toks["llama3"]("hi")["input_ids"][0] == 128000
    assert toks["r1_distill"]("hi")["input_ids"][0] == 151646
    assert toks["qwen2"]("hi")["input_ids"] == ids(toks["qwen2"], "hi")
    assert toks["olmo2"]("hi")["input_ids"] == ids(toks["olmo2"], "hi")


def test_llama3_conversion_encodes_like_tiktokens_rank_bpe(toks):
    """The tokenizer.json converted from tokenizer.model (scripts/make_tokenizer_fixtures.py) gives
    the ids of tiktoken's algorithm: split with Llama 3's regex, then merge the adjacent pair whose
    concatenation has the lowest rank (= id) until none is in the vocabulary."""
    byte_str = {v: k for k, v in _bytes_to_unicode().items()}
    ranks = {bytes(byte_str[c] for c in token): rank for token, rank in vocab("llama3").items()}
    pattern = regex.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                            r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

    def bpe(piece: bytes) -> list[int]:
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            rank, i = min((ranks.get(parts[i] + parts[i + 1], 1 << 30), i) for i in range(len(parts) - 1))
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [ranks[p] for p in parts]

    # (the README names specials: "<|" is broken up so that only ordinary text is compared)
    for text in ROUND_TRIP + [FIXTURES.joinpath("README.md").read_text().replace("<|", "< |")]:
        expected = [i for piece in pattern.findall(text) for i in bpe(piece.encode())]
        assert ids(toks["llama3"], text) == expected


def _bytes_to_unicode() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return bytes_to_unicode()


@pytest.mark.parametrize("family, template, end_of_turn", [
    ("qwen2", "qwen3", "<|im_end|>"),
    ("qwen2", "qwen2_5", "<|im_end|>"),
    ("llama3", "llama3_1", "<|eot_id|>"),
    ("llama3", "llama3_2", "<|eot_id|>"),
    ("r1_distill", "deepseek_r1_distill", "<｜end▁of▁sentence｜>"),
    ("olmo2", None, "<|endoftext|>"),
])
def test_shipped_templates_render_with_single_token_specials(family, template, end_of_turn):
    tok = tokenizer(family, trl_template(template) if template else OLMO2_TULU_TEMPLATE)
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert end_of_turn in text
    full = ids(tok, text)
    eot = tok.convert_tokens_to_ids(end_of_turn)
    assert eot in full and end_of_turn not in tok.decode([t for t in full if t != eot])
    assert FAMILIES[family].end_of_turn == end_of_turn


def test_trl_template_reads_the_installed_package():
    assert "<|im_start|>" in trl_template("qwen3")
    with pytest.raises(FileNotFoundError, match="no chat template 'no_such'"):
        trl_template("no_such")


ARCH_FAMILY = {"qwen2": ("qwen2", "qwen2_5"), "qwen3": ("qwen2", "qwen3"), "llama": ("llama3", "llama3_1"),
               "gemma3_text": ("llama3", "gemma3"), "olmo2": ("olmo2", None)}
TIED = {"qwen2", "gemma3_text"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_builds_reloads_and_runs_a_forward(tmp_path, toks, arch):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    family, template = ARCH_FAMILY[arch]
    text = trl_template(template) if template else OLMO2_TULU_TEMPLATE
    path = build_model(arch, tmp_path / arch, family, text)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch and model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) == len(toks[family])
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert tok.chat_template == text
    # The reloaded tokenizer (the class the real tokenizer_config names) splits like the fixture.
    sample = "Hi there\n\n2023 650841823 don't"
    assert tok(sample)["input_ids"] == toks[family](sample)["input_ids"]
    with safe_open(path / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (arch not in TIED)
    assert model.config.tie_word_embeddings == (arch in TIED)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**prompt).logits
    assert logits.shape == (1, prompt["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
    stops = GenerationConfig.from_pretrained(path).eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    assert tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn) in stops


@pytest.mark.parametrize("family, instruct, expected", [
    ("qwen2", True, [151645, 151643]), ("qwen2", False, 151643),
    ("llama3", True, [128001, 128008, 128009]), ("llama3", False, 128001),
    ("olmo2", True, 100257),
])
def test_generation_config_stops_like_the_real_instruct_and_base_models(tmp_path, family, instruct, expected):
    from transformers import GenerationConfig

    arch = {"qwen2": "qwen2", "llama3": "llama", "olmo2": "olmo2"}[family]
    path = build_model(arch, tmp_path / "m", family, instruct=instruct)
    assert GenerationConfig.from_pretrained(path).eos_token_id == expected


# ------------------------------------------------------------------ posttrain's chat functions on them

CHATS = [("qwen2", "qwen3", "<|im_end|>"), ("qwen2", "qwen2_5", "<|im_end|>"), ("llama3", "llama3_1", "<|eot_id|>"),
         ("r1_distill", "deepseek_r1_distill", "<｜end▁of▁sentence｜>"), ("olmo2", None, "<|endoftext|>")]
CHAT_IDS = [f"{family}-{template or 'tulu'}" for family, template, _ in CHATS]


def chat_tokenizer(family: str, template: str | None):
    return tokenizer(family, trl_template(template) if template else OLMO2_TULU_TEMPLATE)


@pytest.mark.parametrize("family, template, end_of_turn", CHATS, ids=CHAT_IDS)
def test_end_of_turn_and_stop_ids_are_the_templates(family, template, end_of_turn):
    from posttrain_cli.data import chat

    tok = chat_tokenizer(family, template)
    eot = tok.convert_tokens_to_ids(end_of_turn)
    assert chat.end_of_turn(tok) == [eot]
    assert set(chat.stop_ids(tok, tok.eos_token_id)) == {eot, tok.eos_token_id}


@pytest.mark.parametrize("family, template, end_of_turn", CHATS, ids=CHAT_IDS)
def test_one_turn_trains_the_answer_and_its_end_of_turn_after_the_generation_prompt(family, template, end_of_turn):
    """The untrained prefix is exactly the sampling prompt (what the model sees at inference), the
    trained tokens hold the answer and the end-of-turn token, and BOS appears at most once (the
    template writes it; the tokenizer must not add a second)."""
    from posttrain_cli.data import chat

    tok = chat_tokenizer(family, template)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "The answer is 4."}]
    [ex] = chat.tokenize_conversation(tok, messages)
    first = ex.loss_mask.index(True)
    assert ex.input_ids[:first] == chat.prompt_ids(tok, messages[:1])
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert "The answer is 4." in tok.decode(trained)
    assert tok.convert_tokens_to_ids(end_of_turn) in trained
    assert all(ex.loss_mask[first:]), "the trained tokens are one run to the end"
    if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id:
        assert ex.input_ids.count(tok.bos_token_id) <= 1
    assert chat.tokenize_response(tok, messages[:1], messages[1]).input_ids == ex.input_ids


@pytest.mark.parametrize("family, template, end_of_turn, examples", [
    ("qwen2", "qwen3", "<|im_end|>", 2),
    ("qwen2", "qwen2_5", "<|im_end|>", 1),
    ("llama3", "llama3_1", "<|eot_id|>", 1),
    ("r1_distill", "deepseek_r1_distill", "<｜end▁of▁sentence｜>", 2),
    ("olmo2", None, "<|endoftext|>", 1),
], ids=CHAT_IDS)
def test_two_turns_train_both_answers(family, template, end_of_turn, examples):
    """Templates that rewrite history (Qwen3 gives only the last turn a think block; R1 distills drop
    reasoning from earlier turns) give one example per answer; the others one example for both."""
    from posttrain_cli.data import chat

    tok = chat_tokenizer(family, template)
    eot = tok.convert_tokens_to_ids(end_of_turn)
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    got = chat.tokenize_conversation(tok, messages)
    assert len(got) == examples
    trained = [[t for t, m in zip(ex.input_ids, ex.loss_mask) if m] for ex in got]
    assert sum(ids_.count(eot) for ids_ in trained) == 2
    assert "2" in tok.decode(trained[0]) and "4" in tok.decode(trained[-1])


@pytest.mark.parametrize("text, spans, trained", [
    # "Ġthere" (2, 8) crosses into the answer "there<|im_end|>" (3, 18): trained, as is <|im_end|>.
    ("Hi there<|im_end|>", [(3, 18)], ["Ġthere", "<|im_end|>"]),
    # ... and crosses out of the answer "Hi " (0, 3) into the next text: not trained.
    ("Hi there<|im_end|>", [(0, 3)], ["Hi"]),
    # U+200D (chars 2 and 4) is split over two byte tokens with the same offsets: both trained with it.
    ("x👨\u200d👩\u200d👧y", [(2, 3)], ["âĢ", "į"]),
    ("x👨\u200d👩\u200d👧y", [(1, 2), (4, 6)], ["ðŁĳ¨", "âĢ", "į", "ðŁĳ§"]),
    # Two answers, the token (2, 8) starting in the first and crossing into the second: trained in neither.
    ("Hi there<|im_end|>", [(0, 3), (5, 18)], ["Hi", "<|im_end|>"]),
])
def test_trained_tokens_by_character_offsets_under_byte_level_bpe(toks, text, spans, trained):
    from posttrain_cli.data.chat import _encode

    tok = toks["qwen2"]
    ex = _encode(tok, text, spans)
    assert [p for p, m in zip(tok.convert_ids_to_tokens(ex.input_ids), ex.loss_mask) if m] == trained


def test_mask_from_span_edges_equals_the_per_token_offsets_rule(toks):
    """chat._span_mask (a few lookups at each span's edges) gives the per-token rule's mask
    (_offsets_mask) on random texts and spans, multi-byte characters and specials included."""
    import random

    from posttrain_cli.data.chat import _offsets_mask, _span_mask

    rng = random.Random(0)
    pieces = ["hello", " world", "  ", "\n", "\n\n", "日本語", "🙂", "é", " [INST]", "<|im_end|>", "<|eot_id|>",
              "123", "\t", "naïve", "👨\u200d👩\u200d👧", "<think>", "a"]
    for family, tok in toks.items():
        for _ in range(300):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 2 * rng.randint(1, 3))))
            spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
            enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
            assert _span_mask(enc, len(enc.ids), spans) == _offsets_mask(enc.offsets, spans), (family, text, spans)
