"""The stage worker: reads RUN_DIR/<stage>/stage.yaml, runs the stage kind, publishes.

    python -m posttrain_cli.pipeline.worker runs/tiny/sft/stage.yaml     # what launchers call

Outputs are written into RUN_DIR/<stage>/.work-<attempt>/ and renamed into place
only when the stage (and its eval) finished; manifest.json is written last.
A failure leaves the previous outputs untouched-or-absent, never half-written.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from posttrain_cli.pipeline.stagedir import EXIT_STOPPED, this_process, write_error
from posttrain_cli.procs import die_with_parent, quiet_libraries


def _setup_logging(stage_dir: Path, rank: int) -> logging.Logger:
    log_dir = stage_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"posttrain.stage.{stage_dir.name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.FileHandler(log_dir / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


def _publish(stage_dir: Path, work_dir: Path, outputs: dict) -> None:
    for rel in outputs.values():
        src, dst = work_dir / rel, stage_dir / rel
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        os.replace(src, dst)
    shutil.rmtree(work_dir, ignore_errors=True)


def run_stage(spec_path: str | Path) -> int:
    """Run one stage; returns the exit code (0 ok, 2 user input, 1 crash, EXIT_STOPPED stopped on a
    signal with a checkpoint: under SLURM the job script requeues the job on it)."""
    import yaml

    spec_path = Path(spec_path).resolve()
    spec = yaml.safe_load(spec_path.read_text())
    stage_dir = spec_path.parent
    quiet_libraries()
    from posttrain_cli.engine import dist

    dist.init()
    rank = dist.rank()
    log = _setup_logging(stage_dir, rank)
    from posttrain_cli.engine.checkpoint import Preempted
    from posttrain_cli.errors import StageFailed, UserError
    from posttrain_cli.pipeline import manifest
    from posttrain_cli.pipeline.context import StageContext

    work_dir = stage_dir / f".work-{spec['attempt']}"
    ctx = StageContext(spec, stage_dir, work_dir, log)
    started = time.time()
    try:
        _seed(spec["run"]["seed"])
        if rank == 0:
            # A requeued SLURM job runs the same attempt again: start from an empty work dir.
            shutil.rmtree(work_dir, ignore_errors=True)
            work_dir.mkdir(parents=True)
            if not spec.get("eval_only"):
                # The processes working on the stage: a later run or status that finds them all gone
                # while the manifest still says running marks the stage failed (stagedir.reap_dead).
                me = this_process("rank 0")
                procs = [p for p in (manifest.read(stage_dir) or {}).get("procs") or []
                         if (p.get("host"), p.get("pid")) != (me["host"], me["pid"])]
                manifest.update(stage_dir, status="running", started=started, procs=procs + [me])
        dist.barrier()
        result = _execute(ctx, spec)
        dist.barrier()
        if rank == 0:
            ctx.trackers.finish(result["metrics"])
            if not spec.get("eval_only"):
                _publish(stage_dir, work_dir, result["outputs"])
            shutil.rmtree(work_dir, ignore_errors=True)
            old = manifest.read(stage_dir) or {}
            manifest.write(stage_dir, {
                **old,
                "status": "completed",
                "kind": spec["kind"],
                "fingerprint": spec["fingerprint"],
                "eval_fingerprint": spec["eval_fingerprint"],
                "inputs": spec["inputs"],
                "outputs": result["outputs"] if not spec.get("eval_only") else old.get("outputs", {}),
                "metrics": result["metrics"],
                "batch": spec["batch"],
                # An eval-only re-run keeps the training timings and adds its own.
                "timings": {**(old.get("timings") or {}), "eval_seconds": round(time.time() - started, 2)}
                if spec.get("eval_only") else
                {"started": started, "finished": time.time(), "seconds": round(time.time() - started, 2)},
                "versions": manifest.versions(),
                "log": str(stage_dir / "logs" / "rank0.log"),
            })
        dist.barrier()
        if rank == 0 and not spec.get("eval_only"):
            from posttrain_cli.engine import checkpoint

            checkpoint.clear(stage_dir)
        return 0
    except Preempted as e:
        log.warning("%s", e)
        write_error(stage_dir, rank, f"{e}; the same command resumes it", EXIT_STOPPED)
        return EXIT_STOPPED
    except UserError as e:
        log.error("input error: %s", e)
        write_error(stage_dir, rank, str(e), 2)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (loading, tokenizing, evaluating; inside it SIGINT stops at
        # the next step with a checkpoint, engine/checkpoint.py StopSignals): nothing to save.
        from posttrain_cli.engine import checkpoint

        log.warning("interrupted (SIGINT)")
        ckpt = checkpoint.latest(stage_dir) if not spec.get("eval_only") else None
        write_error(stage_dir, rank, "interrupted by SIGINT (Ctrl-C); the same command " +
                    (f"resumes it from {ckpt.name}" if ckpt else "runs it again"), EXIT_STOPPED)
        return EXIT_STOPPED
    except StageFailed as e:  # a failure the stage explains itself (Diverged): its message alone
        log.error("stage failed:\n%s", traceback.format_exc())
        write_error(stage_dir, rank, str(e), 1)
        return 1
    except BaseException as e:  # noqa: BLE001 - recorded, then the launcher reports it
        log.error("stage crashed:\n%s", traceback.format_exc())
        write_error(stage_dir, rank, f"{type(e).__name__}: {e}", 1)
        return 1


def _execute(ctx, spec: dict) -> dict:
    ecfg = spec["stage"].get("eval")
    evals = {}
    if spec.get("eval_only"):
        from posttrain_cli.pipeline import manifest
        from posttrain_cli.stages.eval import evaluate

        old = manifest.read(ctx.stage_dir) or {}
        metrics = dict(old.get("metrics") or {})
        rm = ctx.models.get("eval.reward_model")
        if ecfg.get("before"):
            evals["before"] = evaluate(ctx, ctx.input_model, ecfg, ctx.where("eval"), rm)
        evals["after"] = evaluate(ctx, str(ctx.stage_dir / "model"), ecfg, ctx.where("eval"), rm)
        metrics["eval"] = evals
        _report_eval(ctx, evals)
        return {"metrics": metrics, "outputs": {}}
    from posttrain_cli.kinds import KINDS

    module = importlib.import_module(KINDS[spec["kind"]].module)
    rm = ctx.models.get("eval.reward_model")
    if ecfg and ecfg.get("before"):
        from posttrain_cli.stages.eval import evaluate

        evals["before"] = evaluate(ctx, ctx.input_model, ecfg, ctx.where("eval"), rm)
        ctx.info(f"eval before: accuracy {evals['before']['accuracy']:.1%}")
    result = module.run(ctx)
    if "model" in result["outputs"] and (ctx.work_dir / "adapter").is_dir():
        result["outputs"]["adapter"] = "adapter"  # a LoRA stage's adapter, beside its merged model (engine/lora.py)
    if ecfg and "model" in result["outputs"]:
        from posttrain_cli.stages.eval import evaluate

        evals["after"] = evaluate(ctx, str(ctx.work_dir / result["outputs"]["model"]), ecfg, ctx.where("eval"), rm)
        _report_eval(ctx, evals)
    if evals:
        result["metrics"]["eval"] = {**evals, **result["metrics"].get("eval", {})}
    return result


def _report_eval(ctx, evals: dict) -> None:
    parts = [f"{k} {v['accuracy']:.1%}" + (f" (reward {v['reward']:.3g})" if "reward" in v else "")
             for k, v in evals.items()]
    ctx.info(f"eval ({evals['after']['verifier']}, {evals['after']['n']} prompts): " + ", ".join(parts))


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m posttrain_cli.pipeline.worker RUN_DIR/<stage>/stage.yaml", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_parent()
    code = run_stage(sys.argv[1])
    _exit(code)


def _exit(code: int) -> None:
    """Leave a rank process without the interpreter's teardown. With a live gloo process group and
    DeepSpeed's engines, destructors running at exit in a random order now and then hit a joinable
    C++ thread ("terminate called without an active exception", SIGABRT) after the stage had
    finished and published. Everything is written and flushed by now."""
    try:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway; the exit code is the stage's
        pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
