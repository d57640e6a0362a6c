"""Tables and plans for the terminal (rich only; no torch)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain_cli.config import model_size
from posttrain_cli.config.schema import stage_deepspeed, stage_lora
from posttrain_cli.kinds import KINDS
from posttrain_cli.kinds.base import samples
from posttrain_cli.pipeline import manifest

# Off a terminal (CI logs, pipes) rich would wrap at 80 columns; tables need more.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def stage_table(run_dir: Path, names: list[str], actions: dict[str, str] | None = None,
                title: str | None = None, jobs: dict[str, dict] | None = None) -> Table:
    """One row per stage from its manifest. The `pref` columns (held-out preference pairs ranked
    chosen-first) appear when a stage measured them."""
    from rich import box

    rows, any_pref, any_rl, any_data = [], False, False, False
    for name in names:
        m = manifest.read(Path(run_dir) / name) or {}
        metrics = m.get("metrics") or {}
        ev = metrics.get("eval") or {}
        held = metrics.get("heldout") or {}
        any_pref = any_pref or bool(held)
        trend = _trend_cell(metrics)
        any_rl = any_rl or trend != "-"
        data = _data_cell(metrics) if _produces(m.get("kind")) == "dataset" else "-"
        any_data = any_data or data != "-"
        status = m.get("status", "not run")
        if actions and name in actions and status == "completed":
            status = {"skip": "skipped", "eval": "eval re-run"}.get(actions[name], "completed")
        style = {"failed": "red", "cancelled": "red", "running": "yellow", "queued": "yellow",
                 "stopped": "yellow"}.get(m.get("status"), "")
        secs = (m.get("timings") or {}).get("seconds")
        rows.append([name, m.get("kind", "-"), f"[{style}]{status}[/]" if style else status,
                     _fmt(metrics.get("steps")), _fmt(metrics.get("loss")),
                     _fmt(round(metrics["tokens_per_s"]) if metrics.get("tokens_per_s") else None),
                     _fmt((ev.get("before") or {}).get("accuracy"), pct=True),
                     _fmt((ev.get("after") or {}).get("accuracy"), pct=True),
                     _fmt((held.get("before") or {}).get("accuracy"), pct=True),
                     _fmt((held.get("after") or {}).get("accuracy"), pct=True),
                     trend,
                     data, f"{secs:.0f}s" if secs is not None else "-",
                     (jobs or {}).get(name, {}).get("job", "-"), _slurm_cell((jobs or {}).get(name))])
    table = Table(title=title or f"posttrain: {run_dir}", title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False, collapse_padding=True,
                  caption=" ".join(n for n, on in ((PREF_NOTE, any_pref), (RL_NOTE, any_rl), (DATA_NOTE, any_data))
                                   if on) or None,
                  caption_justify="left")
    columns = [("stage", "left"), ("kind", "left"), ("status", "left"), ("steps", "right"), ("loss", "right"),
               ("tok/s", "right"), ("acc before", "right"), ("acc after", "right"), ("pref before", "right"),
               ("pref after", "right"), ("train reward", "right"), ("data out", "right"), ("time", "right"),
               ("job", "right"), ("slurm", "left")]
    keep = [i for i, (col, _) in enumerate(columns)
            if (any_pref or not col.startswith("pref")) and (any_rl or col != "train reward")
            and (any_data or col != "data out") and (jobs is not None or col not in ("job", "slurm"))]
    for i in keep:
        table.add_column(columns[i][0], justify=columns[i][1], no_wrap=True)
    for row in rows:
        table.add_row(*[row[i] for i in keep])
    return table


def _produces(kind) -> str | None:
    """What a manifest's kind produces (None for a kind this version does not know)."""
    record = KINDS.get(kind) if isinstance(kind, str) else None
    return record.produces if record else None


def _slurm_cell(job: dict | None) -> str:
    """A job's SLURM state, with the reason a pending job waits (Dependency, Priority, ...)."""
    if not job:
        return "-"
    state = job["state"].lower()
    reason = job.get("reason") or ""
    return f"{state} ({reason})" if reason and reason != "None" and state in ("pending", "cancelled") else state


def _trend_cell(metrics: dict) -> str:
    """An RL stage's reward, first tenth -> last tenth; a distill stage's reverse KL to its teachers
    (held-out when measured, else on its own training samples)."""
    for key, label in (("heldout_reverse_kl", "KL "), ("reverse_kl", "KL "), ("reward", "")):
        if f"{key}_start" in metrics:
            return f"{label}{metrics[f'{key}_start']:.3g} -> {metrics[f'{key}_end']:.3g}"
    return "-"


def _data_cell(metrics: dict) -> str:
    """A dataset stage's output: rows written, and for rejection sampling the prompts accepted."""
    if "rows" not in metrics:
        return "-"
    cell = f"{metrics['rows']} rows"
    if "acceptance_rate" in metrics:
        cell += f", {100 * metrics['acceptance_rate']:.0f}% acc."
    return cell


PREF_NOTE = ("acc: held-out generation accuracy (eval block). pref: share of held-out preference pairs whose "
             "reward prefers chosen: a reward model's score, or DPO's implicit reward b*log(pi/pi_ref), which is 0 "
             "(a tie, 50%) before training.")
RL_NOTE = ("train reward: an RL stage's mean reward on its own samples, first tenth of the steps -> last tenth "
           "(distill: KL, the student's reverse KL to its teachers per token, on held-out prompts when it has them).")
DATA_NOTE = "data out: rows a generation stage wrote (rejection sampling: share of prompts with a row kept)."


ROUND_NAME = re.compile(r"^(?P<prefix>.+?)(?P<round>\d+)\.(?P<stage>.+)$")


def waves(steps) -> dict[str, int]:
    """The earliest wave each stage can start in: 1 + the latest wave of its inputs. Stages of one
    wave do not depend on each other (branches): a launcher may run them at once."""
    out: dict[str, int] = {}
    for step in steps:
        out[step.node.name] = 1 + max((out[d] for d in step.node.deps), default=0)
    return out


def _ranks_text(c: dict) -> str:
    if c["launcher"] == "slurm":
        from posttrain_cli.config.cluster import ranks_per_node

        gpus = f", {c['gpus_per_node']} GPU(s) each" if c["gpus_per_node"] else ""
        return (f"  [bold]slurm[/] a job per stage: {c['nodes']} node(s) x {ranks_per_node(c)} rank(s){gpus}"
                + (f", partition {c['partition']}" if c["partition"] else "") + " (stages' resources: override)")
    return (f"  [bold]ranks[/] {c['nproc_per_node']} x {c['nnodes']} node(s)"
            + (f"  [bold]parallel stages[/] {c['parallel_stages']}" if c["parallel_stages"] > 1 else ""))


def print_graph(steps) -> None:
    """The stage graph, in run order: each stage's wave, kind and inputs, rounds under a header."""
    wave = waves(steps)
    width = max(len(s.node.name) for s in steps)
    shared = {w for w in wave.values() if list(wave.values()).count(w) > 1}
    console.print("\n[bold]stage graph[/] (wave: when a stage can start; stages marked || in one wave are "
                  "independent branches and run at once with cluster.parallel_stages > 1)")
    current = None
    for step in steps:
        node = step.node
        m = ROUND_NAME.match(node.name)
        block = (m.group("prefix"), m.group("round")) if m else None
        if block != current:
            if block:
                console.print(f"  [bold]round {block[1]}[/] ({block[0]}{block[1]}.*)")
            current = block
        mark = "||" if wave[node.name] in shared else "  "
        deps = f"<- {', '.join(node.deps)}" if node.deps else ""
        console.print(f"  {'  ' if block else ''}wave {wave[node.name]:<3} {mark} {node.name:<{width}}  "
                      f"{node.kind:<18} {deps}", markup=False)


def _stage_deepspeed_text(ds: dict) -> str:
    """A training stage's deepspeed settings where its own block changes the run's."""
    return (f"ZeRO-{ds['zero_stage']}" + (" +offload" if ds["offload_optimizer"] or ds["offload_param"] else "")
            + (" +activation checkpointing" if ds["activation_checkpointing"] else "")
            + (" +torch.compile" if ds["compile"] else "") + (" +liger kernels" if ds["kernels"] == "liger" else "")
            + f", precision {ds['precision']}")


def _template_text(model: dict) -> str:
    """The chat template, when the run sets one (a name or a file; an inline template is long)."""
    t = model["chat_template"]
    if t is None:
        return ""
    return f" (chat template {'inline' if '{{' in t or '{%' in t else t})"


def _sampler_text(run: dict, node, rl_cfg: dict | None) -> str:
    """The stage's rollout backend as plan shows it: "vllm (auto)", "hf (auto: vllm is not installed)";
    an RL stage sampling with vllm adds its importance-weight cap."""
    from posttrain_cli.pipeline.graph import effective_rollout
    from posttrain_cli.rollout.select import planned

    backend, why = planned(effective_rollout(run, node))
    text = backend + (f" ({why})" if why else "")
    if backend == "vllm" and rl_cfg is not None:
        cap = rl_cfg["is_cap"]
        text += f"; importance weights p_trainer / p_sampler {f'capped at {cap:g}' if cap is not None else 'uncapped'}"
    return text


def _input_config(run: dict, nodes: dict, node) -> dict:
    """config.json of the model a stage starts from: a stage's output has its input's architecture,
    so a chain of stages leads back to a path, a hub id or the tiny model."""
    what, value = node.model_input or next(iter(node.refs.values()))
    while what == "stage":
        what, value = nodes[value].model_input or next(iter(nodes[value].refs.values()))
    if what == "tiny":
        return model_size.tiny_config(value)
    return model_size.find_config(value, run["model"]["revision"])


def _count(n: int) -> str:
    return next((f"{n / 10 ** e:.2f}{u}" for e, u in ((9, "B"), (6, "M"), (3, "K")) if n >= 10 ** e), str(n))


def _bytes(n: int) -> str:
    return next((f"{n / 10 ** e:.1f} {u}" for e, u in ((12, "TB"), (9, "GB"), (6, "MB"), (3, "kB")) if n >= 10 ** e),
                f"{n} B")


def _lora_size_text(run: dict, nodes: dict, node, lora: dict) -> str:
    """How many parameters a LoRA stage trains and the model states (weights, gradients, AdamW
    moments; config/model_size.py) of a full fine-tune and of the adapter; or why plan cannot count."""
    precision, why = model_size.plan_precision(stage_deepspeed(run, node.cfg)["precision"])
    try:
        size = model_size.lora_size(_input_config(run, nodes, node), lora, precision,
                                    scorer=KINDS[node.kind].produces == "scorer")
    except model_size.NoCount as e:
        return f"; parameter count: {e}"
    return (f": {_count(size.trainable)} of {_count(size.total)} parameters train ({size.trainable / size.total:.2%}); "
            f"model states {_bytes(size.full_bytes)} full -> {_bytes(size.lora_bytes)} (weights, gradients, AdamW "
            f"moments in {precision}{', ' + why if why else ''}; activations not counted)")


def _precision_text(precision: str) -> str:
    """An explicit precision in the plan's header; bf16 without CUDA is autocast over fp32 weights
    (engine/deepspeed_engine.py cpu_autocast)."""
    if precision == "auto":
        return ""
    if precision == "bf16" and not model_size.has_cuda():
        return " bf16 (autocast, fp32 weights: no CUDA here)"
    return f" {precision}"


def print_plan(run: dict, steps) -> None:
    console.print(f"[bold]recipe[/] {run['name']}  [bold]run_dir[/] {run['run_dir']}  "
                  f"[bold]model[/] {run['model']['path']}{_template_text(run['model'])}  [bold]deepspeed[/] ZeRO-{run['deepspeed']['zero_stage']}"
                  f"{' +offload' if run['deepspeed']['offload_optimizer'] or run['deepspeed']['offload_param'] else ''}"
                  f"{' +activation checkpointing' if run['deepspeed']['activation_checkpointing'] else ''}"
                  f"{' +torch.compile' if run['deepspeed']['compile'] else ''}"
                  f"{' +liger kernels' if run['deepspeed']['kernels'] == 'liger' else ''}"
                  f"{_precision_text(run['deepspeed']['precision'])}"
                  + _ranks_text(run["cluster"]))
    print_graph(steps)
    nodes = {step.node.name: step.node for step in steps}
    for i, step in enumerate(steps, 1):
        node, cfg = step.node, step.node.cfg
        record = KINDS[node.kind]
        action = {"run": "[green]will run[/]", "skip": "[dim]skip (done, same fingerprint)[/]",
                  "eval": "[yellow]eval only (model done)[/]"}[step.action]
        console.print(f"\n[bold]{i}. {node.name}[/] ({node.kind})  {action}  fingerprint {step.fingerprint}")
        if node.model_input is not None:
            what, value = node.model_input
            src = {"stage": f"stage {value}", "tiny": "tiny model (built locally)", "path": value}[what]
            console.print(f"   from: {src}")
        if record.trains:
            length = f"max_steps {cfg['max_steps']}" if cfg["max_steps"] else f"epochs {cfg['epochs']:g}"
            console.print(f"   lr {cfg['lr']:g} ({cfg['schedule']}, warmup_ratio {cfg['warmup_ratio']:g}), {length}, "
                          f"weight_decay {cfg['weight_decay']:g}, grad_clip {cfg['grad_clip']}, "
                          f"max_seq_len {cfg['max_seq_len']}"
                          + (f", packing {cfg['packing']}, truncation {cfg['truncation']}, multi_turn {cfg['multi_turn']}" if "packing" in cfg else ""))
            b = step.batch
            if record.rl:
                console.print(f"   rollout: {cfg['prompts_per_step']} prompts x {cfg['num_generations']} completions "
                              f"per step ({b['prompts_per_rank']} prompts per rank), max_new_tokens "
                              f"{cfg['max_new_tokens']}, temperature {cfg['temperature']:g}, top_p {cfg['top_p']:g}")
            console.print(f"   batch: {'per update ' if record.rl else ''}global "
                          f"{b['global_batch_size']} = micro {b['micro_batch_size']} x "
                          f"{b['world_size']} rank(s) x {b['grad_accum']} accumulation; "
                          f"<= {b['max_tokens_per_step']:,} tokens/step")
        for line in record.describe(cfg):
            console.print(line)
        for s in cfg["data"]:
            name = s["path"] if s["path"] else f"output of stage {s['from']}"
            console.print(f"   data: {name} (split {s['split']}, weight {s['weight']:g})")
        for s in cfg.get("heldout") or []:
            console.print(f"   heldout: {s['path'] or 'output of stage ' + s['from']}")
        if cfg.get("eval"):
            e = cfg["eval"]
            srcs = ", ".join(s["path"] or f"stage {s['from']}" for s in e["data"])
            console.print(f"   eval: {e['verifier']} on {srcs}, max_new_tokens {e['max_new_tokens']}"
                          f"{', before and after' if e['before'] else ''}"
                          f"{', reward model ' + e['reward_model'] if e.get('reward_model') else ''}")
        if samples(record, cfg):
            console.print(f"   sampler: {_sampler_text(run, node, cfg if record.rl else None)}")
        if record.trains and cfg.get("deepspeed"):
            console.print(f"   deepspeed: {_stage_deepspeed_text(stage_deepspeed(run, cfg))} (the stage's own block)")
        lora = stage_lora(run, cfg)
        if lora is not None:
            alpha = lora["alpha"] if lora["alpha"] is not None else 2 * lora["r"]
            targets = lora["target_modules"] if isinstance(lora["target_modules"], str) else ", ".join(lora["target_modules"])
            console.print(f"   lora: r {lora['r']}, alpha {alpha:g}, {targets}"
                          + (", rsLoRA" if lora["use_rslora"] else "") + (f", init {lora['init']}" if lora["init"] != "default" else "")
                          + (", 4-bit NF4 base (QLoRA)" if lora["quantize"] else "")
                          + _lora_size_text(run, nodes, node, lora) + "; publishes the merged model and adapter/")
        console.print(f"   out: {step.stage_dir}/{record.out}")
