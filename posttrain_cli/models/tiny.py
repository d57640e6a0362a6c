"""The tiny world's model: a small Llama and a character tokenizer, built locally.

Nothing is downloaded. The tokenizer covers printable ASCII one character per
token plus a few special tokens, so any small text task trains on it; the chat
template marks roles with single special tokens and ends every turn with EOS,
which is where generation stops.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Defaults of model=tiny (conf/model/tiny.yaml repeats them so `plan` shows them).
DEFAULT_ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=512,
    seed=0,
)


def build_tokenizer(max_length: int = DEFAULT_ARCH["max_position_embeddings"]):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    # A BPE model with no merges is a character tokenizer that keeps spaces
    # and newlines as tokens; Fuse joins them back without separators.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def arch_key(arch: dict) -> str:
    blob = json.dumps({**DEFAULT_ARCH, **arch}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tiny(out_dir: str | Path, arch: dict | None = None) -> Path:
    """Write a seeded tiny Llama + tokenizer as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = {**DEFAULT_ARCH, **(arch or {})}
    out_dir = Path(out_dir)
    tok = build_tokenizer(arch["max_position_embeddings"])
    heads = arch["num_attention_heads"]
    # vocab_size (optional): embedding and head rows beyond the tokenizer's, which no text uses, so
    # the head costs what a real vocabulary's does (benchmarks of a 32k-vocabulary model).
    vocab = max(len(tok), int(arch.get("vocab_size") or 0))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=arch["max_position_embeddings"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(int(arch["seed"]))
    model = LlamaForCausalLM(config).float()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
