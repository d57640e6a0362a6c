"""What the runner asks of a launcher, and which launcher a cluster uses.

A launcher is a module with two functions:

    check(cluster)                                  before anything is written: can it run here?
    execute(run, pending, say, *, dry_run, wait)    run (or submit) the stages that are not done

`execute` gets the plan's steps to run, in recipe order (an order the graph allows), and goes
through pipeline/stagedir.py for their specs and outcomes. `dry_run` writes what would run and
prints it; `wait` asks a launcher that submits and returns (slurm) to follow its jobs to the end.
It raises UserError (exit 2) or StageFailed (exit 1) for a stage that did not complete.
"""

from __future__ import annotations

from types import ModuleType

from posttrain_cli.launch import local, slurm

# cluster.launcher -> the launcher.
LAUNCHERS: dict[str, ModuleType] = {"local": local, "slurm": slurm}


def for_cluster(cluster: dict) -> ModuleType:
    return LAUNCHERS[cluster["launcher"]]
