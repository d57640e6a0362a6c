"""Refuse models that cannot be merged, each a UserError naming the stage key: a different
architecture (config.json), different tensor names, a different shape for a tensor, a
different tokenizer (vocabulary and added tokens for every model, chat template for the
merged models; the base may be a base model with no template).

A model whose output embedding is tied (no lm_head.weight stored) reads its input embedding
in its place when another model stores one; the merged model then stores lm_head.weight and
is untied.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from posttrain_cli.errors import UserError
from posttrain_cli.merge.shards import TOKENIZER_FILES, Checkpoint

# Config keys that decide what a tensor of a given shape means (checked on top of the shapes).
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "num_local_experts",
             "num_experts")
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def _short(where: str) -> str:
    return where.rsplit(".", 1)[-1]


def _arch(config: dict) -> dict:
    out = {k: config.get(k) for k in ARCH_KEYS}
    if isinstance(config.get("text_config"), dict):
        out.update({f"text_config.{k}": config["text_config"].get(k) for k in ARCH_KEYS})
    return out


def _tie_outputs(ckpts: list[Checkpoint]) -> None:
    """Where some models store lm_head.weight and others tie it to the input embedding, the tied
    ones read their input embedding in its place."""
    stored = [c for c in ckpts if OUTPUT_EMBEDDING in c.entries]
    if not stored or len(stored) == len(ckpts):
        return
    shape = stored[0].entries[OUTPUT_EMBEDDING].shape
    for c in ckpts:
        if OUTPUT_EMBEDDING in c.entries:
            continue
        found = [n for n, e in c.entries.items() if n.endswith(INPUT_EMBEDDINGS) and e.shape == shape]
        if len(found) == 1:
            c.alias[OUTPUT_EMBEDDING] = found[0]


def _names(names: set[str], limit: int = 2) -> str:
    shown = sorted(names)[:limit]
    return ", ".join(f"'{n}'" for n in shown) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def tokenizer_signature(path: Path) -> dict | None:
    """What makes two tokenizers the same: vocabulary (with merges), added tokens, chat template.
    None when the directory holds no tokenizer."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    sig: dict = {}
    tj = path / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text())
        model = data.get("model") or {}
        vocab = json.dumps([model.get("type"), model.get("vocab"), model.get("merges")], sort_keys=True)
        sig["vocabulary"] = hashlib.sha256(vocab.encode()).hexdigest()
        sig["added tokens"] = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
    else:
        for f in ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json"):
            if (path / f).is_file():
                sig[f] = hashlib.sha256((path / f).read_bytes()).hexdigest()
    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    else:
        for f in ("tokenizer_config.json", "chat_template.json"):
            if (path / f).is_file():
                template = json.loads((path / f).read_text()).get("chat_template") or template
    sig["chat template"] = template
    return sig


def check(models: list[Checkpoint], base: Checkpoint | None) -> None:
    """Refuse models that cannot be merged, with one line naming the stage key."""
    ckpts = models + ([base] if base else [])
    ref, ref_name = models[0], _short(models[0].where)
    ref_arch = _arch(ref.config)
    for c in ckpts[1:]:
        diff = [k for k, v in _arch(c.config).items() if v != ref_arch[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{c.where}: architecture differs from {ref_name}'s ({k} {_arch(c.config)[k]} vs "
                            f"{ref_arch[k]}); merged models must share one architecture")
    _tie_outputs(ckpts)
    for c in ckpts[1:]:
        lacks, extra = ref.names() - c.names(), c.names() - ref.names()
        if lacks or extra:
            parts = ([f"lacks {_names(lacks)}"] if lacks else []) + ([f"has {_names(extra)} that {ref_name} lacks"]
                                                                      if extra else [])
            raise UserError(f"{c.where}: tensor names differ from {ref_name}'s: it {' and '.join(parts)}")
        for name in sorted(ref.names()):
            if c.entry(name).shape != ref.entry(name).shape:
                raise UserError(f"{c.where}: tensor '{name}' has shape {list(c.entry(name).shape)}, "
                                f"{ref_name}'s has {list(ref.entry(name).shape)}")
    ref_tok = tokenizer_signature(ref.path)
    if ref_tok is None:
        raise UserError(f"{ref.where}: {ref.path} has no tokenizer files; the merged model takes its tokenizer "
                        f"from {ref_name}")
    for c in ckpts[1:]:
        tok = tokenizer_signature(c.path)
        if tok is None:
            continue
        keys = [k for k in ref_tok if k != "chat template" or c is not base]
        diff = [k for k in keys if tok.get(k) != ref_tok[k]] + [k for k in tok if k not in ref_tok]
        if diff:
            raise UserError(f"{c.where}: tokenizer differs from {ref_name}'s ({diff[0]}); merged models must "
                            f"share one tokenizer")
