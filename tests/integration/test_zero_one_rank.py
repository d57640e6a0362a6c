"""ZeRO-1/2 on one rank trains as ZeRO-0 (engine/deepspeed_engine.py nothing_to_shard): the same
update as DeepSpeed's real ZeRO-2 on the same batches — losses, gradient norms (before clipping, with
clipping engaged) and the final weights — without ZeRO's float32 copy of the weights; DeepSpeed's
bf16 keeps its stage."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from pathlib import Path
    from posttrain_cli.engine import dist, deepspeed_engine as eng
    from posttrain_cli.models.tiny import build_tiny
    dist.init()
    out = Path(sys.argv[1])
    build_tiny(out / "base", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "max_position_embeddings": 64})
    train = {"lr": 1e-2, "weight_decay": 0.1, "adam_betas": [0.9, 0.95], "adam_eps": 1e-8,
             "warmup_ratio": 0.0, "schedule": "linear", "min_lr_ratio": 0.0}
    report = {}
    for name, shard in (("zero2", True), ("as_zero0", None)):
        if shard:
            eng.nothing_to_shard = lambda cfg: False  # DeepSpeed's own ZeRO-2 at one rank, as before
        else:
            del eng.nothing_to_shard
            import importlib; importlib.reload(eng)
        ds = {"zero_stage": 2, "offload_optimizer": False, "offload_param": False, "precision": "fp32", "config": {}}
        cfg = eng.ds_config(ds, micro_batch_size=2, grad_accum=2, grad_clip=0.05)
        torch.manual_seed(0)
        model = eng.load_causal_lm(str(out / "base"), {}, cfg, train=True)
        engine = eng.initialize(model, cfg, train, 6)
        engine.train()
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(5, 90, (2, 20), generator=gen) for _ in range(2)]
        losses, norms = [], []
        for step in range(6):
            for ids in batches:
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss)
                engine.step()
            losses.append(loss.item())
            norms.append(float(engine.get_global_grad_norm()))
        report[name] = {"stage": engine.zero_optimization_stage(), "losses": losses, "norms": norms,
                        "fp32_copy": hasattr(engine.optimizer, "single_partition_of_fp32_groups")}
        torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, out / f"{name}.pt")
    # DeepSpeed's bf16 (bf16 weights, float32 masters) is not rerouted: its masters are the point.
    bf16 = eng.ds_config({"zero_stage": 2, "offload_optimizer": False, "offload_param": False,
                          "precision": "bf16", "config": {}}, micro_batch_size=2, grad_accum=1, grad_clip=1.0)
    report["bf16_rerouted"] = eng.nothing_to_shard(bf16)
    offload = eng.ds_config({"zero_stage": 2, "offload_optimizer": True, "offload_param": False,
                             "precision": "fp32", "config": {}}, micro_batch_size=2, grad_accum=1, grad_clip=1.0)
    report["offload_rerouted"] = eng.nothing_to_shard(offload)
    (out / "report.json").write_text(json.dumps(report))
    sys.stdout.flush(); sys.stderr.flush()
    import torch.distributed as tdist
    tdist.destroy_process_group()
    os._exit(0)
""")


@pytest.mark.slow
def test_one_rank_zero2_trains_as_zero0_with_the_same_update(tmp_path):
    import torch

    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    real, mine = rep["zero2"], rep["as_zero0"]
    assert (real["stage"], mine["stage"]) == (2, 0)
    assert real["fp32_copy"] and not mine["fp32_copy"]
    assert all(n > 0.05 for n in real["norms"])  # clipping engaged at every step
    assert mine["losses"] == real["losses"] and mine["norms"] == real["norms"]  # bit for bit
    assert real["losses"][-1] < real["losses"][0]
    a, b = torch.load(tmp_path / "zero2.pt"), torch.load(tmp_path / "as_zero0.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(b[k], a[k]), k
    assert rep["bf16_rerouted"] is False and rep["offload_rerouted"] is False


ZERO0_2RANK = textwrap.dedent("""
    import json, os, sys, torch
    from pathlib import Path
    from posttrain_cli.engine import dist, deepspeed_engine as eng
    from posttrain_cli.models.tiny import build_tiny
    dist.init()
    out = Path(sys.argv[1])
    if dist.is_main():
        build_tiny(out / "base", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "max_position_embeddings": 64})
    dist.barrier()
    ds = {"zero_stage": 0, "offload_optimizer": False, "offload_param": False, "precision": "fp32", "config": {}}
    cfg = eng.ds_config(ds, micro_batch_size=2, grad_accum=1, grad_clip=0.05)
    model = eng.load_causal_lm(str(out / "base"), {}, cfg, train=True)
    train = {"lr": 1e-2, "weight_decay": 0.0, "adam_betas": [0.9, 0.95], "adam_eps": 1e-8,
             "warmup_ratio": 0.0, "schedule": "constant", "min_lr_ratio": 0.0}
    engine = eng.initialize(model, cfg, train, 2)
    engine.train()
    ids = torch.randint(5, 90, (2, 20), generator=torch.Generator().manual_seed(dist.rank()))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    grads_norm = float(engine.get_global_grad_norm())
    (out / f"rank{dist.rank()}.json").write_text(json.dumps({"norm": grads_norm,
        "w": engine.module.model.embed_tokens.weight[5, :4].tolist()}))
    sys.stdout.flush(); sys.stderr.flush()
    import torch.distributed as tdist
    tdist.destroy_process_group()
    os._exit(0)
""")


@pytest.mark.slow
def test_zero0_two_ranks_report_one_clipped_norm(tmp_path):
    """deepspeed=zero0 on 2 ranks: the norm of the all-reduced gradients, the same on both ranks,
    and the same update on both (ZeRO-0 reported no norm before)."""
    import os

    script = tmp_path / "z0.py"
    script.write_text(ZERO0_2RANK)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert a["norm"] == b["norm"] > 0.05 and a["w"] == b["w"]
