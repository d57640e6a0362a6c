"""Streaming merge over hand-made safetensors checkpoints: reading, sharding, checks, tied heads, memory."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain_cli.errors import UserError
from posttrain_cli.merge import memory, shards, stream

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4, "intermediate_size": 6,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 5,
          "dtype": "float32", "tie_word_embeddings": False}
TOKENIZER = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2}, "merges": []},
             "added_tokens": [{"id": 3, "content": "<s>"}, {"id": 4, "content": "</s>"}]}


def tensors(seed: int, dtype=torch.float32, head: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(5, 4, generator=g),
           "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g),
           "model.layers.0.input_layernorm.weight": torch.randn(4, generator=g),
           "model.norm.weight": torch.randn(4, generator=g)}
    if head:
        out["lm_head.weight"] = torch.randn(5, 4, generator=g)
    out = {k: v.to(dtype) for k, v in out.items()}
    out["model.step"] = torch.tensor([seed], dtype=torch.int64)
    return out


def write_model(path: Path, state: dict, *, shards: int = 1, config: dict | None = None,
                tokenizer: dict | None = TOKENIZER, template: str | None = "{{ messages }}") -> Path:
    """A model directory: config.json, tokenizer.json, chat_template.jinja and the tensors in
    `shards` files (+ the index json when more than one)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, **(config or {})}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    if tokenizer is not None:
        (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    if template is not None:
        (path / "chat_template.jinja").write_text(template)
    names = list(state)
    if shards == 1:
        save_file(state, path / "model.safetensors")
        return path
    weight_map = {}
    for i in range(shards):
        part = {k: state[k] for k in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, path / fname)
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def load_dir(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = set(json.loads(index.read_text())["weight_map"].values())
    else:
        files = {"model.safetensors"}
    out = {}
    for f in files:
        out.update(load_file(path / f))
    return out


def run(tmp_path, dirs, method="linear", base=None, **opts) -> tuple[dict, dict]:
    models = [(f"stages.m.models[{i}]", d) for i, d in enumerate(dirs)]
    out = tmp_path / "out"
    stats = stream.merge(models, out, method=method, base=("stages.m.base", base) if base else None, **opts)
    return load_dir(out), stats


def test_read_matches_safetensors(tmp_path):
    state = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int32),
             "c": torch.tensor(2.5), "d": torch.tensor([True, False])}
    save_file(state, tmp_path / "x.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = stream.Checkpoint(tmp_path, "stages.m.models[0]")
    for k, v in state.items():
        assert torch.equal(ckpt.read(k), v) and ckpt.read(k).dtype == v.dtype
    # A slice of the flat view: elements 4..9 of "a".
    assert torch.equal(ckpt.read("a", 4, 6), state["a"].flatten()[4:10])
    ckpt.close()


def test_linear_sharded_and_single(tmp_path):
    """A 3-shard model and a single-file one; output in shards of at most 100 bytes, each tensor
    (max 96 bytes) whole in one shard; the int buffer is the first model's."""
    a, b = tensors(1), tensors(2)
    dirs = [write_model(tmp_path / "a", a, shards=3), write_model(tmp_path / "b", b)]
    out, stats = run(tmp_path, dirs, weights=[1, 3], max_shard_size=100)
    for k in a:
        expected = a[k] if k == "model.step" else (a[k] + 3 * b[k]) / 4
        assert torch.allclose(out[k], expected, atol=1e-6), k
    assert out["model.step"].dtype == torch.int64
    assert stats["tensors"] == 6 and stats["shards"] == len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    for f in (tmp_path / "out").glob("*.safetensors"):
        assert f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") <= 100
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a) and index["metadata"]["total_size"] == stats["bytes_written"]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "out" / f).is_file()


def test_output_dtype(tmp_path):
    dirs = [write_model(tmp_path / "a", tensors(1, torch.bfloat16)), write_model(tmp_path / "b", tensors(2))]
    out, _ = run(tmp_path, dirs)
    assert out["model.norm.weight"].dtype == torch.bfloat16  # auto: the first model's
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    stream.merge([("m0", dirs[0]), ("m1", dirs[1])], tmp_path / "o2", method="linear", dtype="float32")
    merged = load_dir(tmp_path / "o2")
    assert merged["model.norm.weight"].dtype == torch.float32
    a, b = tensors(1, torch.bfloat16), tensors(2)
    expected = (a["model.norm.weight"].float() + b["model.norm.weight"]) / 2
    assert torch.allclose(merged["model.norm.weight"], expected, atol=1e-6)
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["dtype"] == "float32"


def test_slices_equal_whole(tmp_path, monkeypatch):
    """An elementwise method over slices of 7 elements (tensors of 24 and 20) equals the whole-tensor merge."""
    dirs = [write_model(tmp_path / n, tensors(s)) for n, s in (("a", 1), ("b", 2), ("base", 3))]
    whole = stream.merge([("m0", dirs[0]), ("m1", dirs[1])], tmp_path / "w", method="task_arithmetic",
                         base=("b", dirs[2]), weights=[0.5, 2])
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 7)
    stream.merge([("m0", dirs[0]), ("m1", dirs[1])], tmp_path / "s", method="task_arithmetic",
                 base=("b", dirs[2]), weights=[0.5, 2])
    assert whole["tensors"] == 6
    w, s = load_dir(tmp_path / "w"), load_dir(tmp_path / "s")
    assert all(torch.equal(w[k], s[k]) for k in w)


def test_dare_reproducible_across_layouts(tmp_path):
    """Seeded per tensor name: the same merge of differently sharded copies gives the same bytes,
    another seed does not."""
    a, b, base = tensors(1), tensors(2), tensors(3)
    one = [write_model(tmp_path / "a1", a), write_model(tmp_path / "b1", b), write_model(tmp_path / "c1", base)]
    two = [write_model(tmp_path / "a2", a, shards=3), write_model(tmp_path / "b2", b, shards=2),
           write_model(tmp_path / "c2", base, shards=2)]
    results = []
    for i, (dirs, seed, shard) in enumerate(((one, 5, 10**9), (two, 5, 90), (one, 6, 10**9))):
        stream.merge([("m0", dirs[0]), ("m1", dirs[1])], tmp_path / f"o{i}", method="dare_ties",
                     base=("b", dirs[2]), density=0.5, seed=seed, max_shard_size=shard)
        results.append(load_dir(tmp_path / f"o{i}"))
    assert all(torch.equal(results[0][k], results[1][k]) for k in a)
    assert not torch.equal(results[0]["model.layers.0.mlp.up_proj.weight"],
                           results[2]["model.layers.0.mlp.up_proj.weight"])


def test_tied_head(tmp_path):
    """models[0] ties its output embedding (no lm_head.weight stored): its input embedding stands in,
    and the merged model stores lm_head.weight and is untied."""
    a, b = tensors(1, head=False), tensors(2)
    dirs = [write_model(tmp_path / "a", a, config={"tie_word_embeddings": True}), write_model(tmp_path / "b", b)]
    out, _ = run(tmp_path, dirs)
    assert torch.allclose(out["lm_head.weight"], (a["model.embed_tokens.weight"] + b["lm_head.weight"]) / 2)
    assert torch.allclose(out["model.embed_tokens.weight"],
                          (a["model.embed_tokens.weight"] + b["model.embed_tokens.weight"]) / 2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    # Both tied: nothing to untie.
    dirs = [dirs[0], write_model(tmp_path / "c", tensors(3, head=False), config={"tie_word_embeddings": True})]
    stream.merge([("m0", dirs[0]), ("m1", dirs[1])], tmp_path / "o2", method="linear")
    assert "lm_head.weight" not in load_dir(tmp_path / "o2")
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["tie_word_embeddings"] is True


def refused(tmp_path, dirs, method="linear", base=None) -> str:
    with pytest.raises(UserError) as e:
        run(tmp_path, dirs, method=method, base=base)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refuses_mismatches(tmp_path):
    a = write_model(tmp_path / "a", tensors(1))
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(json.dumps(CONFIG))
    torch.save(tensors(2), bin_only / "pytorch_model.bin")
    msg = refused(tmp_path, [a, bin_only])
    assert msg.startswith("stages.m.models[1]:") and "pytorch_model.bin" in msg and "safetensors" in msg

    wide = write_model(tmp_path / "wide", tensors(2), config={"num_attention_heads": 4})
    msg = refused(tmp_path, [a, wide])
    assert msg.startswith("stages.m.models[1]: architecture differs") and "num_attention_heads 4 vs 2" in msg

    fewer = {k: v for k, v in tensors(2).items() if k != "model.norm.weight"}
    msg = refused(tmp_path, [a, write_model(tmp_path / "fewer", fewer)])
    assert msg.startswith("stages.m.models[1]: tensor names differ") and "'model.norm.weight'" in msg

    shaped = {**tensors(2), "model.norm.weight": torch.zeros(5)}
    msg = refused(tmp_path, [a, write_model(tmp_path / "shaped", shaped)])
    assert msg == "stages.m.models[1]: tensor 'model.norm.weight' has shape [5], models[0]'s has [4]"

    vocab = {**TOKENIZER, "model": {**TOKENIZER["model"], "vocab": {"a": 0, "b": 1, "d": 2}}}
    msg = refused(tmp_path, [a, write_model(tmp_path / "vocab", tensors(2), tokenizer=vocab)])
    assert msg.startswith("stages.m.models[1]: tokenizer differs") and "vocabulary" in msg

    chat = write_model(tmp_path / "chat", tensors(2), template="{{ other }}")
    msg = refused(tmp_path, [a, chat])
    assert "chat template" in msg

    msg = refused(tmp_path, [write_model(tmp_path / "notok", tensors(2), tokenizer=None, template=None), a])
    assert msg.startswith("stages.m.models[0]:") and "no tokenizer" in msg

    base = write_model(tmp_path / "base", tensors(3), config={"hidden_size": 8})
    msg = refused(tmp_path, [a, write_model(tmp_path / "b", tensors(2))], method="ties", base=base)
    assert msg.startswith("stages.m.base: architecture differs")


def test_base_may_lack_chat_template(tmp_path):
    """A base model without the merged models' chat template (a pretrained base) is fine."""
    dirs = [write_model(tmp_path / "a", tensors(1)), write_model(tmp_path / "b", tensors(2))]
    base = write_model(tmp_path / "base", tensors(3), template=None)
    out, _ = run(tmp_path, dirs, method="task_arithmetic", base=base)
    a, b, c = tensors(1), tensors(2), tensors(3)
    k = "model.norm.weight"
    assert torch.allclose(out[k], c[k] + (a[k] - c[k]) + (b[k] - c[k]), atol=1e-6)


def test_fetch_local_and_missing(tmp_path):
    assert shards.fetch(str(tmp_path), "stages.m.models[0]") == tmp_path
    with pytest.raises(UserError, match=r"stages.m.models\[0\]='./nope' does not exist"):
        shards.fetch("./nope", "stages.m.models[0]")


def test_fetch_hub_id(tmp_path, monkeypatch):
    """An org/name that is not a local directory is downloaded (safetensors, configs, tokenizer only);
    a failed download is one line naming the key."""
    import huggingface_hub

    calls = []

    def fake(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        if repo_id == "org/missing":
            raise OSError("Repository Not Found\nmore detail")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert shards.fetch("org/model", "stages.m.base", "main") == tmp_path
    assert calls[0][:2] == ("org/model", "main") and "*.safetensors" in calls[0][2]
    assert not any("bin" in p for p in calls[0][2])
    with pytest.raises(UserError) as e:
        shards.fetch("org/missing", "stages.m.models[1]")
    assert str(e.value) == ("stages.m.models[1]='org/missing' is not a local directory and could not be fetched "
                            "from the hub (OSError: Repository Not Found)")


def test_peak_memory_stays_near_one_tensor(tmp_path):
    """Two 64 MB models (64 tensors of 1 MB): a linear merge keeps a few tensors resident, not the
    models (a whole-model load would take 128 MB); a memory-mapped reader would fail this too.
    A small merge runs first so one-time costs (lazy imports, allocator arenas: 15-30 MB) are not
    counted against the streaming."""
    if not memory.reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak-RSS counter")

    def make(name, tensors, numel):
        for i in range(2):
            g = torch.Generator().manual_seed(i)
            state = {f"w{j}": torch.randn(numel, generator=g) for j in range(tensors)}
            (tmp_path / f"{name}{i}").mkdir()
            save_file(state, tmp_path / f"{name}{i}" / "model.safetensors")
            (tmp_path / f"{name}{i}" / "config.json").write_text(json.dumps(CONFIG))
            (tmp_path / f"{name}{i}" / "tokenizer.json").write_text(json.dumps(TOKENIZER))

    make("warm", 2, 16)
    make("m", 64, 1 << 18)
    stream.merge([("w0", tmp_path / "warm0"), ("w1", tmp_path / "warm1")], tmp_path / "warm_out", method="linear")
    size = 64 << 20
    memory.reset_peak_rss()
    before = memory.rss()
    stream.merge([("m0", tmp_path / "m0"), ("m1", tmp_path / "m1")], tmp_path / "out", method="linear")
    delta = memory.peak_rss() - before
    assert delta < 0.5 * size, f"peak {delta / 2**20:.0f} MiB above the start for 64 MiB models"
