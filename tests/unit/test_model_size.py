"""Parameter counts from config.json (config/model_size.py): a small Llama counted by hand, every
supported architecture against transformers' own models, LoRA's trainable count against peft, the
4-bit base against bitsandbytes, and the lora line of `posttrain plan` as a user types it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from posttrain_cli.config import model_size as ms
from posttrain_cli.models.tiny import build_tiny, build_tokenizer
from tests.conftest import posttrain

# 2 layers, hidden 4, 2 heads of head_dim 2, 1 key/value head, MLP 6, vocabulary 10.
HAND = {"model_type": "llama", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": False}
LORA_DEFAULTS = {"r": 2, "target_modules": "all-linear", "modules_to_save": None, "quantize": None}


def lora(**kw) -> dict:
    return {**LORA_DEFAULTS, **kw}


def test_a_two_layer_llama_by_hand():
    # embed 10 x 4 = 40. A layer: q 4x4 = 16, k 4x2 = 8, v 8, o 16, gate 4x6 = 24, up 24, down 24
    # (120) + 2 norms of 4 = 128; 2 layers 256. Final norm 4, lm_head 40: 40 + 256 + 4 + 40 = 340.
    assert ms.count(ms.modules(HAND)) == 340
    assert ms.count(ms.modules({**HAND, "tie_word_embeddings": True})) == 300
    # LoRA r 2 on all-linear, r (in + out) a layer: q 2x8 = 16, k 2x6 = 12, v 12, o 16, gate, up and
    # down 2x10 = 20 each: 116 a layer, 232 in all; peft counts the model with it: 340 + 232 = 572.
    size = ms.lora_size(HAND, lora(), "bf16")
    assert (size.trainable, size.total) == (232, 572)
    # Model states: full 16 x 340 = 5440 bytes; LoRA: the frozen 340 in bf16 (680) + 16 x 232 (3712).
    assert (size.full_bytes, size.lora_bytes) == (5440, 4392)
    assert ms.lora_size(HAND, lora(), "fp32").lora_bytes == 4 * 340 + 16 * 232
    # q_proj and v_proj only: (16 + 12) x 2 layers = 56.
    assert ms.lora_size(HAND, lora(target_modules=["q_proj", "v_proj"]), "bf16").trainable == 56
    # A reward model: no lm_head (-40), a score head of 4 (+4) trained in full beside the adapter.
    rm = ms.lora_size(HAND, lora(), "bf16", scorer=True)
    assert (rm.trainable, rm.total, rm.full_bytes) == (232 + 4, 304 + 236, 16 * 304)


def test_the_tiny_model_by_hand():
    # model=tiny: vocabulary 7 special tokens + 100 printable characters = 107, hidden 128, MLP 384,
    # 4 layers of 4 heads. A layer: 4 x 128 x 128 (attention) + 3 x 128 x 384 (MLP) + 2 x 128 = 213,248;
    # x 4 = 852,992; + embed and lm_head 2 x 107 x 128 = 27,392 + final norm 128 = 880,512.
    # LoRA r 8: a layer 4 x 8 x 256 + 3 x 8 x 512 = 20,480; x 4 = 81,920.
    size = ms.lora_size(ms.tiny_config({}), lora(r=8), "fp32")
    assert (size.trainable, size.total - size.trainable) == (81_920, 880_512)


def test_nf4_bytes_by_hand():
    # A 4096 x 4096 weight: 8,388,608 bytes of values, 262,144 blocks of 64 (one byte each), 1,024
    # fp32 scales of those (4,096 bytes), the code tables 16 x 4 + 256 x 4 + 4 = 1,092: about 0.516 a value.
    assert ms.nf4_bytes(4096 * 4096) == 8_388_608 + 262_144 + 4_096 + 1_092


def test_unknown_architectures_and_missing_keys_say_why():
    with pytest.raises(ms.NoCount, match="unknown architecture 'xyz'"):
        ms.modules({**HAND, "model_type": "xyz"})
    with pytest.raises(ms.NoCount, match="config.json has no intermediate_size"):
        ms.modules({k: v for k, v in HAND.items() if k != "intermediate_size"})
    with pytest.raises(ms.NoCount, match="target 'qkv' names no module of llama"):
        ms.lora_size(HAND, lora(target_modules=["q_proj", "qkv"]), "bf16")
    with pytest.raises(ms.NoCount, match="target 'input_layernorm' is not a linear layer of llama"):
        ms.lora_size(HAND, lora(target_modules=["input_layernorm"]), "bf16")


SMALL = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Name -> (transformers config class, its settings over SMALL).
CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "llama-tied-biased": ("LlamaConfig", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", {}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8}),
}


def _config(name: str):
    cls, settings = CONFIGS[name]
    if not hasattr(transformers, cls):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    return getattr(transformers, cls)(**SMALL, **settings)


def _config_json(config, tmp_path: Path) -> dict:
    """config.json as save_pretrained writes it, read the way plan reads a local model."""
    config.save_pretrained(tmp_path)
    return ms.find_config(str(tmp_path))


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _scorer(config):
    """A reward model as engine/deepspeed_engine.py loads one: a sequence classifier, one label."""
    config = copy.deepcopy(config)
    config.num_labels = 1
    return transformers.AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_counts_equal_transformers_models(name, tmp_path):
    hf_config = _config(name)
    config = _config_json(hf_config, tmp_path)
    causal = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert ms.count(ms.modules(config)) == _numel(causal)
    assert ms.count(ms.modules(config, scorer=True)) == _numel(_scorer(hf_config))


@pytest.mark.parametrize("name, targets, save", [
    ("llama", "all-linear", None),
    ("llama-tied-biased", "all-linear", None),
    ("qwen3", ["q_proj", "v_proj"], None),
    ("olmo2", ["o_proj", "down_proj", "lm_head"], None),
    ("qwen2-tied", ["q_proj", "lm_head"], None),
    ("gemma2", "all-linear", ["embed_tokens", "lm_head"]),
    ("qwen2-tied", ["k_proj", "lm_head"], ["lm_head"]),
])
def test_lora_counts_equal_peft(name, targets, save, tmp_path):
    hf_config = _config(name)
    config = _config_json(hf_config, tmp_path)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, modules_to_save=save))
    size = ms.lora_size(config, lora(r=4, target_modules=targets, modules_to_save=save), "bf16")
    assert (size.trainable, size.total) == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_a_reward_models_lora_count_equals_peft(name, tmp_path):
    # As engine/lora.py wraps a reward model: all-linear, its score head in modules_to_save.
    hf_config = _config(name)
    config = _config_json(hf_config, tmp_path)
    config_peft = LoraConfig(r=4, target_modules="all-linear", modules_to_save=["score"])
    peft_model = get_peft_model(_scorer(hf_config), config_peft)
    size = ms.lora_size(config, lora(r=4), "bf16", scorer=True)
    assert (size.trainable, size.total) == peft_model.get_nb_trainable_parameters()


def test_the_4bit_base_takes_the_bytes_bitsandbytes_holds(tmp_path):
    pytest.importorskip("bitsandbytes")
    # Qwen 2 has biases on q, k and v, which stay unquantized beside their 4-bit weights.
    config = transformers.Qwen2Config(**{**SMALL, "hidden_size": 64, "intermediate_size": 96})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    # QLoRA's settings, the engine's: NF4, double quantization, bf16 matmuls.
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"}, quantization_config=quant)
    except Exception as e:  # an older bitsandbytes without CPU kernels
        pytest.skip(f"bitsandbytes cannot quantize on this CPU: {e}")

    def nbytes(t):
        return t.numel() * t.element_size()

    held = 0
    for p in model.parameters():
        held += nbytes(p)
        if hasattr(p, "quant_state"):
            s = p.quant_state
            held += sum(nbytes(t) for t in (s.absmax, s.code, s.offset, s.state2.absmax, s.state2.code))
    assert sum(hasattr(p, "quant_state") for p in model.parameters()) == 7 * 2
    assert ms.frozen_bytes(ms.modules(ms.find_config(str(tmp_path))), "bf16", quantized=True) == held


def test_the_tiny_config_is_the_tiny_models(tmp_path):
    arch = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}
    assert ms.tiny_config({})["vocab_size"] == len(build_tokenizer())
    build_tiny(tmp_path, arch)
    built = ms.count(ms.modules(ms.find_config(str(tmp_path))))
    assert ms.count(ms.modules(ms.tiny_config(arch))) == built
    assert built == _numel(transformers.AutoModelForCausalLM.from_pretrained(tmp_path))


def test_a_hub_config_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ms.NoCount, match="config.json not downloaded yet"):
        ms.find_config("org/model")
    _cache(tmp_path, "org/model", "c0ffee", HAND)
    assert ms.find_config("org/model") == HAND
    assert ms.find_config("org/model", revision="c0ffee") == HAND
    with pytest.raises(ms.NoCount, match="config.json not downloaded yet"):
        ms.find_config("org/model", revision="v2")
    with pytest.raises(ms.NoCount, match="no config.json in"):
        ms.find_config(str(tmp_path))
    with pytest.raises(ms.NoCount, match="is not a directory"):
        ms.find_config(str(tmp_path / "missing"))


def _cache(hub_cache: Path, repo: str, commit: str, config: dict) -> None:
    """A Hugging Face cache entry for repo's config.json at commit, `main` pointing to it."""
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_plan_prints_what_a_lora_stage_trains(tmp_path):
    r = posttrain("plan", "recipe=tiny", "stages.sft.lora={r: 8}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    # The tiny model by hand above; its model states fp32 without a GPU (4 x 880,512 + 16 x 81,920
    # = 4.83 MB), bf16 with one (2 x 880,512 + 16 x 81,920 = 3.07 MB); full 16 x 880,512 = 14.09 MB.
    gpu = Path("/proc/driver/nvidia/version").exists()
    assert ("lora: r 8, alpha 16, all-linear: 81.92K of 962.43K parameters train (8.51%); model states "
            f"14.1 MB full -> {'3.1' if gpu else '4.8'} MB (weights, gradients, AdamW moments in "
            f"{'bf16' if gpu else 'fp32'}, precision auto: {'' if gpu else 'no '}CUDA driver here; activations "
            "not counted); publishes the merged model and adapter/") in out, out
    assert "parameter count" not in out


def test_plan_counts_a_hub_model_from_the_cache_or_says_it_is_not_there(tmp_path):
    llama_8b = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
    args = ["plan", "recipe=tiny", "model=llama3_1_8b", "deepspeed.precision=bf16", "stages.sft.lora={r: 8}"]
    r = posttrain(*args, cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("lora: r 8, alpha 16, all-linear; parameter count: config.json not downloaded yet; publishes"
            in " ".join(r.stdout.split()))
    _cache(tmp_path / "hub", "meta-llama/Llama-3.1-8B", "abc", llama_8b)
    r = posttrain(*args, cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    # Llama 3.1 8B has 8,030,261,248 parameters; r 8 on all-linear: 32 layers x 8 x (8,192 + 2 x 5,120
    # + 8,192 + 3 x 18,432) = 20,971,520, of 8.05B with the adapter (as peft and the stage's log count).
    # Full: 16 x 8.03B = 128.5 GB; LoRA 2 x 8.03B + 16 x 20.97M = 16.4 GB.
    assert ("all-linear: 20.97M of 8.05B parameters train (0.26%); model states 128.5 GB full -> 16.4 GB "
            "(weights, gradients, AdamW moments in bf16; activations not counted)") in " ".join(r.stdout.split())
