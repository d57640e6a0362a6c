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
from posttrain_cli.pipeline import graph, manifest, stagedir
from posttrain_cli.pipeline.stagedir import Step


def plan(run: dict) -> list[Step]:
    """Validate the graph and the batch arithmetic; decide each stage's action (no torch)."""
    if run["cluster"]["launcher"] == "local" and run["cluster"]["nnodes"] != 1:
        raise UserError(f"cluster.nnodes={run['cluster']['nnodes']}: cluster=local runs on one node")
    _check_run_dir(Path(run["run_dir"]))
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


def _check_run_dir(run_dir: Path) -> None:
    """run_dir is a directory, or can become one: not a file, nor under one."""
    at = run_dir.expanduser()
    while not at.exists() and at != at.parent:
        at = at.parent
    if at.exists() and not at.is_dir():
        what = "is a file" if at == run_dir.expanduser() else f"is under {at}, which is a file"
        raise UserError(f"run_dir={run_dir} {what}; name a directory for the run")


def _root_model(node, nodes: dict) -> tuple | None:
    """The model at the start of a stage's chain of stages: ("tiny", arch) or ("path", value)."""
    seen = set()
    while node is not None and node.name not in seen:
        seen.add(node.name)
        ref = node.model_input or next(iter(node.refs.values()), None)
        if ref is None or ref[0] != "stage":
            return ref
        node = nodes.get(ref[1])
    return None


def preflight(run: dict, steps: list[Step]) -> list[Path]:
    """Every local data file of every stage that will run exists, every row parses and renders with
    the stage's chat template where that can refuse a row (data/render_check.py), and every local
    model directory exists. -> the records of the sources that rendered cleanly, for the caller to
    write once the whole check passed (a failed check writes nothing).

    Done before anything trains, so a bad row in the last stage costs seconds, not hours.
    """
    from posttrain_cli.data.paths import resolve_source_path
    from posttrain_cli.data.render_check import row_render, verdict

    nodes = {step.node.name: step.node for step in steps}
    renders: dict = {}
    hub: dict[str, str | None] = {}
    rendered: list[Path] = []
    for step in steps:
        if step.action == "skip":
            continue
        node = step.node
        for where, src, rows in graph.local_source_files(node):
            check, done = row_render(run, _root_model(node, nodes), rows, renders), None
            if check is not None:
                done = verdict(run["run_dir"], graph._file_signature(resolve_source_path(src["path"])), check)
                check = None if done.is_file() else check
            # Every row checked on every core; the checks below parse again as they go (one chunk held).
            parsed = SourceRows(src, where, schemas.ROW_SCHEMAS[rows], check=check)
            if check is not None:
                rendered.append(done)
            if node.cfg.get("margin") and ".data[" in where:
                schemas.require_margins(parsed, f"stages.{node.name}.margin")
            if not where.startswith(f"stages.{node.name}.eval."):
                KINDS[node.kind].check_rows(node.cfg, parsed, f"stages.{node.name}")
        inputs = ([("from", node.model_input)] if node.model_input else []) + list(node.refs.items())
        for key, (kind, value) in inputs:
            if kind != "path":
                continue
            name = "model.path" if key == "from" and node.cfg.get("from") is None else f"stages.{node.name}.{key}"
            if stagedir.local_model_path(value):
                if not Path(value).expanduser().exists():
                    raise UserError(f"{name}: model directory not found: {value} (a hub id is org/name; a local "
                                    f"path starts with / ./ ../ or ~, or names an existing directory)")
            else:
                if value not in hub:
                    hub[value] = _hub_model_missing(value, run["model"].get("revision"))
                if hub[value]:
                    raise UserError(f"{name}={value}: {hub[value]}")
    return rendered


def _hub_model_missing(repo: str, revision: str | None) -> str | None:
    """Why a hub model cannot load, where that is certain before its stage starts: offline and not in
    the cache, or the hub answers that it has no such model. Unsure (no network): None, and the stage
    says what went wrong when it loads the model."""
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
            return None
    except Exception:  # noqa: BLE001 - an old or broken huggingface_hub: leave it to the stage
        return None
    if constants.HF_HUB_OFFLINE:
        return ("not a local directory, and not in the hub cache while HF_HUB_OFFLINE is set (a local path "
                "starts with / ./ ../ or ~)")
    try:
        HfApi().model_info(repo, revision=revision, timeout=10)
    except RevisionNotFoundError:
        return f"the hub model has no revision {revision!r} (model.revision)"
    except RepositoryNotFoundError:
        return ("not a local directory, and the hub has no model of that name (a private one needs "
                "`huggingface-cli login`; a local path starts with / ./ ../ or ~)")
    except Exception:  # noqa: BLE001 - no network, a timeout: the stage reports it
        return None
    return None


def resolved_text(run: dict, recipe_path: Path) -> str:
    return f"# posttrain: resolved from {recipe_path}\n" + yaml.safe_dump(run, sort_keys=False)


def write_resolved(run: dict, recipe_path: Path) -> Path:
    run_dir = Path(run["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "resolved.yaml"
    # Atomic: `posttrain status` reads it while a run goes on, and a killed run leaves it whole.
    stagedir.write_text_atomic(out, resolved_text(run, recipe_path))
    return out


def _check_not_running(run: dict, steps: list[Step]) -> None:
    """A stage another `posttrain run` is running now is refused (both would write its folder); one
    whose processes died without a word is marked failed (stagedir.reap_dead) and runs again."""
    if run["cluster"]["launcher"] != "local":
        return  # SLURM: the job states decide (launch/slurm.py reconcile)
    for step in steps:
        if step.action == "skip":
            continue
        alive = stagedir.running_procs(step.stage_dir)
        if alive:
            pids = ", ".join(str(p["pid"]) for p in alive)
            raise UserError(f"stage '{step.node.name}' is running now (pid {pids}) in {run['run_dir']}; wait for "
                            f"it, or stop it (kill -INT {alive[0]['pid']}: it saves a checkpoint) and run again")
        stagedir.reap_dead(step.stage_dir)


def _record(run: dict, recipe_path: Path, steps: list[Step], say) -> None:
    """resolved.yaml, the first thing written: a run_dir that cannot be written stops the run here,
    before anything starts. A run with nothing to do writes nothing it does not have to (a finished
    run on a read-only filesystem reports that everything is done)."""
    out = Path(run["run_dir"]) / "resolved.yaml"
    if all(s.action == "skip" for s in steps):
        try:
            if out.read_text() == resolved_text(run, recipe_path):
                return
        except (OSError, UnicodeDecodeError):
            pass
    try:
        write_resolved(run, recipe_path)
    except OSError as e:
        if all(s.action == "skip" for s in steps):
            say(f"every stage is done; {out} not updated ({e.strerror or e})")
            return
        raise UserError(f"run_dir={run['run_dir']}: cannot write there ({e.strerror or e}); name a directory "
                        f"this machine can write") from None


def execute(run: dict, recipe_path: Path, launcher, say=print, *, dry_run: bool = False,
            wait: bool = False) -> list[Step]:
    """Plan and check every stage, then hand the ones that are not done to the launcher
    (launch/base.py: the cluster's, chosen by the CLI). Raises UserError (exit 2) or StageFailed (exit 1).

    `dry_run` writes what would run (slurm: the job scripts) and prints it, running nothing;
    `wait` (slurm) follows the submitted jobs to the end."""
    steps = plan(run)
    _check_not_running(run, steps)
    rendered = preflight(run, steps)
    if not dry_run:
        launcher.check(run["cluster"])
    _record(run, recipe_path, steps, say)
    for done in rendered:
        try:
            done.parent.mkdir(parents=True, exist_ok=True)
            done.touch()
        except OSError:
            pass  # a read-only run directory: rendered again next time
    for step in steps:
        if step.action == "skip":
            say(f"[{step.node.name}] skipped: completed with the same fingerprint {step.fingerprint}")
    launcher.execute(run, [s for s in steps if s.action != "skip"], say, dry_run=dry_run, wait=wait)
    return steps
