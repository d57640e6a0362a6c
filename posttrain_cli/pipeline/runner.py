"""Plan the stages in order, skip what is done, check the inputs, hand the rest to a launcher.

A stage is skipped when its manifest says completed under the same
fingerprint (its training config + its inputs' fingerprints) and its outputs
exist; when only its eval block changed, only the eval re-runs. A change
upstream changes every fingerprint downstream, so exactly the affected stages
run again.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from posttrain_cli.config.cluster import world_size
from posttrain_cli.data import schemas
from posttrain_cli.data.sources import SourceRows
from posttrain_cli.errors import UserError
from posttrain_cli.kinds import KINDS
from posttrain_cli.pipeline import graph, manifest
from posttrain_cli.pipeline.stagedir import Step


def plan(run: dict) -> list[Step]:
    """Validate the graph and the batch arithmetic; decide each stage's action (no torch)."""
    if run["cluster"]["launcher"] == "local" and run["cluster"]["nnodes"] != 1:
        raise UserError(f"cluster.nnodes={run['cluster']['nnodes']}: cluster=local runs on one node")
    nodes = graph.build(run)
    fps = graph.fingerprints(run, nodes)
    steps = []
    for node in nodes:
        fp = fps[node.name]
        sdir = graph.stage_dir(run, node.name)
        ws = world_size(run, node.cfg)
        batch = KINDS[node.kind].batch(f"stages.{node.name}", node.cfg, ws)
        if manifest.is_done(sdir, fp["fingerprint"]):
            same_eval = manifest.read(sdir).get("eval_fingerprint") == fp["eval_fingerprint"]
            action = "skip" if same_eval or fp["eval_fingerprint"] is None else "eval"
        else:
            action = "run"
        steps.append(Step(node, fp["fingerprint"], fp["eval_fingerprint"], action, batch, sdir, fp["resume_key"]))
    return steps


def preflight(run: dict, steps: list[Step]) -> None:
    """Every local data file of every stage that will run exists and every row parses.

    Done before anything trains, so a bad row in the last stage costs seconds, not hours.
    """
    for step in steps:
        if step.action == "skip":
            continue
        node = step.node
        for where, src, rows in graph.local_source_files(node):
            # Every row checked on every core; the checks below parse again as they go (one chunk held).
            parsed = SourceRows(src, where, schemas.ROW_SCHEMAS[rows])
            if node.cfg.get("margin") and ".data[" in where:
                schemas.require_margins(parsed, f"stages.{node.name}.margin")
            if not where.startswith(f"stages.{node.name}.eval."):
                KINDS[node.kind].check_rows(node.cfg, parsed, f"stages.{node.name}")
        inputs = ([("from", node.model_input)] if node.model_input else []) + list(node.refs.items())
        for key, (kind, value) in inputs:
            if kind == "path" and (value.startswith((".", "/", "~")) and not Path(value).expanduser().exists()):
                raise UserError(f"stages.{node.name}.{key}: model directory not found: {value}")



def write_resolved(run: dict, recipe_path: Path) -> Path:
    run_dir = Path(run["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "resolved.yaml"
    header = f"# posttrain: resolved from {recipe_path}\n"
    out.write_text(header + yaml.safe_dump(run, sort_keys=False))
    return out


def execute(run: dict, recipe_path: Path, launcher, say=print, *, dry_run: bool = False,
            wait: bool = False) -> list[Step]:
    """Plan and check every stage, then hand the ones that are not done to the launcher
    (launch/base.py: the cluster's, chosen by the CLI). Raises UserError (exit 2) or StageFailed (exit 1).

    `dry_run` writes what would run (slurm: the job scripts) and prints it, running nothing;
    `wait` (slurm) follows the submitted jobs to the end."""
    steps = plan(run)
    preflight(run, steps)
    if not dry_run:
        launcher.check(run["cluster"])
    write_resolved(run, recipe_path)
    for step in steps:
        if step.action == "skip":
            say(f"[{step.node.name}] skipped: completed with the same fingerprint {step.fingerprint}")
    launcher.execute(run, [s for s in steps if s.action != "skip"], say, dry_run=dry_run, wait=wait)
    return steps
