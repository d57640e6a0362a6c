"""The `posttrain` command. Thin: composes, validates and hands over; no torch at start-up.

    posttrain run recipe=tiny
    posttrain plan recipe=tulu3 model=llama3_1_8b stages.dpo.beta=5
    posttrain recipes
    posttrain status runs/tiny
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from posttrain_cli.errors import StageFailed, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Post-train LLMs with one recipe of ordered stages (SFT, RM, DPO, RL, merge, distill) on DeepSpeed.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

OVERRIDES = typer.Argument(
    None, help="recipe=<name | path.yaml> and Hydra overrides: key=value, group=option, +key=value, ~key",
    show_default=False,
)


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    raise typer.Exit(getattr(e, "exit_code", 1))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(overrides: Optional[List[str]] = OVERRIDES,
        dry_run: bool = typer.Option(False, "--dry-run", help="Write each stage's spec (cluster=slurm: its job "
                                     "script) into RUN_DIR and print what would run; run nothing."),
        wait: bool = typer.Option(False, "--wait", help="cluster=slurm: follow the jobs until they end (exit 1 if "
                                  "a stage fails) instead of returning after submitting.")) -> None:
    """Run a recipe: every stage that is not already done (cluster=slurm: submit one job per stage)."""
    from posttrain_cli.config.compose import compose
    from posttrain_cli.launch.base import for_cluster
    from posttrain_cli.pipeline import runner
    from posttrain_cli.ui import console, stage_table

    try:
        cfg, recipe_path = compose(list(overrides or []))
        steps = runner.execute(cfg, recipe_path, for_cluster(cfg["cluster"]),
                               say=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True),
                               dry_run=dry_run, wait=wait)
    except (UserError, StageFailed) as e:
        _fail(e)
    if dry_run:
        return
    slurm = cfg["cluster"]["launcher"] == "slurm"
    console.print()
    console.print(stage_table(Path(cfg["run_dir"]), [s.node.name for s in steps],
                              {s.node.name: s.action for s in steps}, title=f"posttrain {cfg['name']}: {cfg['run_dir']}",
                              jobs=_jobs(Path(cfg["run_dir"]), [s.node.name for s in steps]) if slurm else None))
    if slurm and not wait:
        console.print(f"Submitted. Follow with: posttrain status {cfg['run_dir']}", markup=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan(overrides: Optional[List[str]] = OVERRIDES) -> None:
    """Show the stages in order with their key settings, batch arithmetic and whether each would run."""
    from posttrain_cli.config.compose import compose
    from posttrain_cli.pipeline import runner
    from posttrain_cli.ui import print_plan

    try:
        cfg, _ = compose(list(overrides or []), allow_missing=True)
        steps = runner.plan(cfg)
    except UserError as e:
        _fail(e)
    print_plan(cfg, steps)


@app.command()
def recipes() -> None:
    """List the recipes shipped with posttrain."""
    import yaml

    from rich.markup import escape

    from posttrain_cli.config.compose import RECIPES_DIR, recipe_names
    from posttrain_cli.ui import console

    for name in recipe_names():
        try:
            desc = (yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(unreadable YAML)"
        console.print(f"[bold]{name:<14}[/] {escape(desc)}")


@app.command()
def status(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/tiny")) -> None:
    """Print the stage table of a run from its manifests."""
    import yaml

    from posttrain_cli.pipeline import manifest
    from posttrain_cli.ui import console, stage_table

    resolved = run_dir / "resolved.yaml"
    if not resolved.is_file():
        _fail(UserError(f"{run_dir}: not a posttrain run directory (no resolved.yaml)"))
    try:
        cfg = yaml.safe_load(resolved.read_text())
        if not isinstance(cfg, dict) or not isinstance(cfg.get("stages"), dict):
            raise ValueError("no stages in it")
    except (yaml.YAMLError, ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        problem = getattr(e, "problem", None) or str(e).splitlines()[0] or type(e).__name__
        _fail(UserError(f"{resolved}: unreadable ({problem}; truncated?); run the same `posttrain run` command "
                        f"to write it again"))
    names = list(cfg["stages"])
    slurm = (cfg.get("cluster") or {}).get("launcher") == "slurm"
    if not slurm:
        from posttrain_cli.pipeline.stagedir import reap_dead

        for name in names:
            try:
                reap_dead(run_dir / name)  # a stage left `running` by processes that died: failed
            except OSError:
                pass  # a read-only run directory: shown as it is
    jobs = _jobs(run_dir, names) if slurm else None
    console.print(stage_table(run_dir, names, title=f"posttrain {cfg.get('name', '')}: {run_dir}", jobs=jobs))
    for name in names:
        m = manifest.read(run_dir / name) or {}
        if m.get("status") in ("failed", "stopped", "cancelled") and m.get("error"):
            console.print(f"{name}: {m['error']}" + (f" (log: {m['log']})" if m.get("log") else ""), markup=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/tiny"),
           out: Optional[Path] = typer.Option(None, "--out", help="Where to write the page (default: "
                                              "RUN_DIR/report.html)")) -> None:
    """Write one self-contained HTML page of a run: the stage graph, curves, before/after, data, timings."""
    from posttrain_cli import report as rep

    try:
        path = rep.write(run_dir, out)
    except UserError as e:
        _fail(e)
    except OSError as e:
        _fail(UserError(f"{out or run_dir / 'report.html'}: cannot write the report ({e.strerror or e})"))
    print(path)


def _jobs(run_dir: Path, names: list[str]) -> dict:
    """Each stage's SLURM job and its state; manifests of jobs that ended badly are marked failed."""
    from posttrain_cli.launch import slurm

    return slurm.reconcile(run_dir, names)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
