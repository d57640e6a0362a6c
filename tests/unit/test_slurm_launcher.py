"""cluster=slurm without a cluster: job scripts, per-stage resources, rank set-up from SLURM's
variables, the world size each stage's batch arithmetic sees, and config errors."""

from __future__ import annotations

import pytest

from posttrain_cli.config.compose import compose
from posttrain_cli.config.cluster import job_resources, ranks_per_node, world_size
from posttrain_cli.engine.dist import from_slurm
from posttrain_cli.errors import UserError
from posttrain_cli.launch import slurm
from posttrain_cli.pipeline import runner


def _steps(*overrides: str, tmp_path):
    # Micro-batches that divide the tiny recipe's batches over up to 16 ranks.
    small = ["stages.sft.micro_batch_size=8", "stages.rm.micro_batch_size=4", "stages.dpo.micro_batch_size=4",
             "stages.grpo.micro_batch_size=8"]
    cfg, _ = compose(["recipe=tiny", "cluster=slurm", f"run_dir={tmp_path / 'run'}", *small, *overrides])
    return cfg, {s.node.name: s for s in runner.plan(cfg)}


def _sbatch(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_job_script_asks_for_the_cluster_resources(tmp_path):
    cfg, steps = _steps("cluster.partition=gpu", "cluster.account=proj", "cluster.qos=high", "cluster.time=04:00:00",
                        "cluster.mem=200G", "cluster.cpus_per_task=12", "cluster.constraint=h100",
                        "cluster.nodes=2", "cluster.signal_seconds=600",
                        "cluster.setup=[module load cuda/12.4,source /opt/venv/bin/activate]",
                        "cluster.srun_args=['--cpu-bind=none']", "cluster.sbatch_args=['--exclusive']",
                        "cluster.python=/opt/venv/bin/python", tmp_path=tmp_path)
    script = slurm.job_script(cfg, steps["sft"], tmp_path / "run" / "sft" / "stage.yaml")
    lines = _sbatch(script)
    assert lines[0] == "--job-name=posttrain.tiny.sft"
    assert f"--output={(tmp_path / 'run' / 'sft' / 'logs').resolve()}/slurm-%j.out" in lines
    for want in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--mem=200G",
                 "--time=04:00:00", "--partition=gpu", "--account=proj", "--qos=high", "--constraint=h100",
                 "--signal=USR1@600", "--requeue", "--kill-on-invalid-dep=yes", "--exclusive", "--open-mode=append"):
        assert want in lines, (want, lines)
    body = script.split("\n\n", 1)[1]
    assert body.index("module load cuda/12.4") < body.index("source /opt/venv/bin/activate") < body.index("srun ")
    assert "srun --kill-on-bad-exit=1 --cpu-bind=none /opt/venv/bin/python -m posttrain_cli.pipeline.worker " in body
    assert "/opt/venv/bin/python -m posttrain_cli.launch.slurm finish" in body and body.rstrip().endswith("exit $rc")
    # The world size the batch arithmetic used is the job's: 2 nodes x 8 GPUs.
    assert steps["sft"].batch["world_size"] == 16


def test_stage_resources_override_the_cluster(tmp_path):
    cfg, steps = _steps("cluster.gpus_per_node=4", "+stages.soup.resources.gpus_per_node=0",
                        "+stages.grpo.resources.nodes=2", "+stages.grpo.resources.time=2-00:00:00",
                        "cluster.signal_seconds=0", "cluster.requeue=false", tmp_path=tmp_path)
    soup = _sbatch(slurm.job_script(cfg, steps["soup"], tmp_path / "s.yaml"))
    assert "--ntasks-per-node=1" in soup and not any(l.startswith("--gpus-per-node") for l in soup)
    assert not any(l.startswith("--signal") for l in soup) and "--no-requeue" in soup
    grpo = _sbatch(slurm.job_script(cfg, steps["grpo"], tmp_path / "g.yaml"))
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=2-00:00:00"} <= set(grpo)
    sft = _sbatch(slurm.job_script(cfg, steps["sft"], tmp_path / "f.yaml"))
    assert "--nodes=1" in sft and "--ntasks-per-node=4" in sft
    assert steps["grpo"].batch["world_size"] == 8 and steps["sft"].batch["world_size"] == 4


def test_ranks_per_node_and_world_size():
    base = {"launcher": "slurm", "nodes": 1, "gpus_per_node": 8, "nproc_per_node": None}
    assert ranks_per_node(base) == 8
    assert ranks_per_node({**base, "gpus_per_node": 0}) == 1
    assert ranks_per_node({**base, "gpus_per_node": 0, "nproc_per_node": 2}) == 2
    res = job_resources(base, {"resources": {"nodes": 4, "gpus_per_node": None}})
    assert res["nodes"] == 4 and res["gpus_per_node"] == 8
    assert world_size({"cluster": base}, {"resources": {"nodes": 4}}) == 32
    # cluster=local ignores resources: one node, nproc_per_node ranks.
    local = {"launcher": "local", "nproc_per_node": 2, "nnodes": 1}
    assert world_size({"cluster": local}, {"resources": {"nodes": 4}}) == 2


def test_ranks_come_from_slurm_variables():
    env = {"POSTTRAIN_SLURM_JOB": "7", "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "8(x2)"}
    from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "16", "1", "8")
    # Outside a posttrain job (an interactive salloc running cluster=local), SLURM's variables are not ours.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    from_slurm(env)
    assert "RANK" not in env
    # torchrun's own variables win.
    env = {"POSTTRAIN_SLURM_JOB": "7", "SLURM_PROCID": "3", "RANK": "0", "SLURM_NTASKS": "4"}
    from_slurm(env)
    assert env["RANK"] == "0"


@pytest.mark.parametrize("override, key", [
    ("cluster.nodes=0", "cluster.nodes=0"),
    ("cluster.gpus_per_node=-1", "cluster.gpus_per_node=-1"),
    ("cluster.launcher=kubernetes", "cluster.launcher"),
    ("+stages.sft.resources.gpus=2", "stages.sft.resources.gpus"),
    ("cluster.partion=gpu", "cluster.partion"),
])
def test_bad_cluster_settings_name_the_key(tmp_path, override, key):
    with pytest.raises(UserError) as e:
        _steps(override, tmp_path=tmp_path)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_local_needs_a_rank_count(tmp_path):
    with pytest.raises(UserError) as e:
        compose(["recipe=tiny", "cluster.nproc_per_node=null"])
    assert "cluster.nproc_per_node=null" in str(e.value)
