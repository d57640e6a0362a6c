"""save_hf never writes a model holding nan or inf: every rank raises Diverged (no rank waits at the
save's barrier), rank 0 names the stage key and the tensor, and nothing is written. Real DeepSpeed
engines under torchrun: ZeRO-2 on 1 rank, ZeRO-3 on 2 (the weights gathered from both ranks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import tiny_engine_script

pytestmark = [pytest.mark.slow, pytest.mark.dist]

SCRIPT = tiny_engine_script("""
    from posttrain_cli.errors import Diverged
    eng.save_hf(engine, build_tokenizer(), out / "finite")           # a finite model is written
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(engine.module.named_parameters())[name]
    if zero == 3:  # rank 0 writes the nan into the gathered weight; its partitions take it back
        import deepspeed
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.is_main():
                with torch.no_grad():
                    param.view(-1)[5] = math.nan
    else:
        with torch.no_grad():
            param.view(-1)[5] = math.nan
    try:
        eng.save_hf(engine, build_tokenizer(), out / "saved", where="stages.sft")
    except Diverged as e:
        print(f"RANK{dist.rank()} DIVERGED {e}", flush=True)
    else:
        print(f"RANK{dist.rank()} SAVED", flush=True)
    dist.barrier()
""", lr=1e-3, weight_decay=0.0)


@pytest.mark.parametrize("zero,nproc", [(2, 1), (3, 2)])
def test_save_hf_refuses_a_nan_tensor_on_every_rank(tmp_path, zero, nproc):
    script = tmp_path / "save_nan.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from posttrain_cli.engine.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(script), str(tmp_path), str(zero)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "finite" / "model.safetensors").is_file()
    assert "SAVED" not in r.stdout, r.stdout
    assert ("RANK0 DIVERGED stages.sft: the trained model holds non-finite values (1 of the 2048 values of "
            "model.layers.1.mlp.down_proj.weight are nan or inf): training diverged; the model is not published; "
            "lower stages.sft.lr") in r.stdout, r.stdout
    for rank in range(1, nproc):
        assert f"RANK{rank} DIVERGED stages.sft: the trained model holds non-finite values" in r.stdout
    assert not (tmp_path / "saved").exists()
