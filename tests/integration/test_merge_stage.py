"""The merge stage through the CLI on tiny models: a sharded input, linear / ties / slerp of stage
outputs, equality with an in-memory merge of the state dicts, the eval block, a re-run that skips,
2 ranks, and mismatches refused with exit 2 and one line naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import mini_recipe, posttrain, stage_manifest, stage_rows

pytestmark = pytest.mark.slow

ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=128)


def _state(path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Three tiny models from different seeds; `b_sharded` is b saved in 20 KB shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain_cli.models.tiny import build_tiny

    tmp = tmp_path_factory.mktemp("merge_models")
    out = {name: build_tiny(tmp / name, {**ARCH, "seed": seed}) for name, seed in (("a", 1), ("b", 2), ("base", 3))}
    sharded = tmp / "b_sharded"
    AutoModelForCausalLM.from_pretrained(out["b"]).save_pretrained(sharded, max_shard_size="20KB")
    AutoTokenizer.from_pretrained(out["b"]).save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    out["b_sharded"] = sharded
    return out


def _recipe(tmp: Path, models: dict) -> Path:
    return mini_recipe(tmp, stages=f"""
      soup:
        kind: merge
        models: [{models['a']}, {models['b_sharded']}]
        weights: [0.3, 0.7]
        max_shard_size: 40KB
        eval: {{data: [{{path: {tmp / 'eval.jsonl'}}}], max_new_tokens: 4}}
      ties:
        kind: merge
        method: ties
        models: [{models['a']}, {models['b_sharded']}]
        base: {models['base']}
        weights: [1.0, 0.5]
        density: [0.5, 0.3]
      mix:
        kind: merge
        method: slerp
        models: [soup, ties]
        t: 0.3
        dtype: bfloat16
    """)


@pytest.fixture(scope="module")
def run(models, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("merge_run")
    rec = _recipe(tmp, models)
    r = posttrain("run", f"recipe={rec}", cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"tmp": tmp, "recipe": rec, "run_dir": tmp / "runs" / "mini", "stdout": r.stdout}


def _assert_equal(out: dict, expected: dict, tol: float = 1e-6) -> None:
    assert out.keys() == expected.keys()
    for k in out:
        torch.testing.assert_close(out[k], expected[k].to(out[k].dtype), atol=tol, rtol=0, msg=k)


def test_linear_of_sharded_checkpoint(run, models):
    a, b = _state(models["a"]), _state(models["b"])
    model_dir = run["run_dir"] / "soup" / "model"
    _assert_equal(_state(model_dir), {k: 0.3 * a[k] + 0.7 * b[k] for k in a})
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) > 1
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert (model_dir / "chat_template.jinja").read_text() == (models["a"] / "chat_template.jinja").read_text()


def test_ties_and_slerp_equal_in_memory_merges(run, models):
    from posttrain_cli.merge.methods import MERGE_METHODS

    a, b, base = _state(models["a"]), _state(models["b"]), _state(models["base"])
    ties = {k: MERGE_METHODS["ties"]([a[k], b[k]], weights=[1.0, 0.5], base=base[k], density=[0.5, 0.3],
                                     normalize=True, t=0.5, generator=None) for k in a}
    _assert_equal(_state(run["run_dir"] / "ties" / "model"), ties)
    soup = _state(run["run_dir"] / "soup" / "model")
    mix = {k: MERGE_METHODS["slerp"]([soup[k], ties[k]], t=0.3) for k in a}
    out = _state(run["run_dir"] / "mix" / "model")
    assert all(v.dtype == torch.bfloat16 for v in out.values())  # dtype: bfloat16
    _assert_equal(out, {k: v.to(torch.bfloat16) for k, v in mix.items()}, tol=0)


def test_metrics_and_eval(run):
    m = stage_manifest(run["run_dir"], "soup")
    assert m["status"] == "completed"
    assert m["metrics"]["method"] == "linear" and m["metrics"]["tensors"] == 21
    assert m["metrics"]["bytes_written"] > 0 and m["metrics"]["shards"] > 1
    assert 0 <= m["metrics"]["eval"]["after"]["accuracy"] <= 1 and m["metrics"]["eval"]["after"]["n"] == 16
    assert stage_rows(run["run_dir"], "ties")[0]["method"] == "ties"
    assert "eval (" in run["stdout"]


def test_rerun_skips(run):
    model_file = run["run_dir"] / "ties" / "model" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    r = posttrain("run", f"recipe={run['recipe']}", cwd=run["tmp"])
    assert r.returncode == 0, r.stdout + r.stderr
    for stage in ("soup", "ties", "mix"):
        assert f"[{stage}] skipped" in r.stdout
    assert model_file.stat().st_mtime_ns == before


@pytest.mark.dist
def test_two_ranks(run, models, tmp_path):
    """Launched on 2 ranks, rank 0 merges and both run the eval block: the same model as 1 rank."""
    r = posttrain("run", f"recipe={run['recipe']}", f"run_dir={tmp_path / 'two'}", "cluster.nproc_per_node=2",
                  cwd=run["tmp"])
    assert r.returncode == 0, r.stdout + r.stderr
    for stage in ("soup", "ties"):
        _assert_equal(_state(tmp_path / "two" / stage / "model"), _state(run["run_dir"] / stage / "model"), tol=0)
    assert stage_manifest(tmp_path / "two", "soup")["metrics"]["eval"]["after"]["n"] == 16


def _refused(tmp: Path, models: list, *needles: str) -> None:
    rec = mini_recipe(tmp, stages=f"""
      m:
        kind: merge
        models: [{', '.join(str(p) for p in models)}]
    """)
    r = posttrain("run", f"recipe={rec}", cwd=tmp)
    err = r.stderr.strip()
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(err.splitlines()) == 1 and "Traceback" not in r.stdout + r.stderr, err
    assert all(n in err for n in needles), err
    assert not (tmp / "runs" / "mini" / "m" / "model").exists()


def test_refuses_other_architecture(models, tmp_path):
    from posttrain_cli.models.tiny import build_tiny

    wide = build_tiny(tmp_path / "wide", {**ARCH, "hidden_size": 48, "seed": 4})
    _refused(tmp_path, [models["a"], wide], "stages.m.models[1]: architecture differs from models[0]'s "
                                            "(hidden_size 48 vs 32)")


def test_refuses_other_tokenizer(models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(models["b"], other)
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    _refused(tmp_path, [models["a"], other], "stages.m.models[1]: tokenizer differs from models[0]'s (chat template)")


def test_refuses_bin_only(models, tmp_path):
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    shutil.copy(models["b"] / "config.json", bin_only)
    torch.save(_state(models["b"]), bin_only / "pytorch_model.bin")
    _refused(tmp_path, [models["a"], bin_only], "stages.m.models[1]: ", "it has pytorch_model.bin but no *.safetensors")
