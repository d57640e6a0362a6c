"""Validate a composed recipe: fill defaults, check types and names, then each stage's own rules.

Every failure is a UserError whose one line names the key (`stages.sft.lr`) and says what
would be accepted. The tables are checked by config/tables.py, each stage kind's rules are its
record's (posttrain_cli/kinds/), and what is checked here holds for every kind alike.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from typing import Any

from posttrain_cli.config import schema
from posttrain_cli.config.model_size import has_cuda
from posttrain_cli.config.tables import _coerce, _suggest, check_sources, check_table, partial
from posttrain_cli.errors import UserError
from posttrain_cli.kinds import KINDS
from posttrain_cli.kinds.base import REQUIRED
from posttrain_cli.procs import compiler_for, compilers, liger_problem


def check_stage(name: str, given: Any, path: str | None = None) -> dict:
    path = path or f"stages.{name}"
    if not isinstance(given, dict):
        raise UserError(f"{path} must be a mapping with at least 'kind', got {given!r}")
    kind = given.get("kind")
    known = sorted([*KINDS, "rounds"])
    if kind is None:
        raise UserError(f"{path}.kind is required (one of: {', '.join(known)})")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{path}.kind: unknown stage kind '{kind}' (known: {', '.join(known)}){hint}")
    record = KINDS[kind]
    stage = check_table(path, given, record.schema)
    stage["data"] = check_sources(f"{path}.data", stage["data"])
    if stage.get("eval"):
        stage["eval"]["data"] = check_sources(f"{path}.eval.data", stage["eval"]["data"])
        if not stage["eval"]["data"]:
            raise UserError(f"{path}.eval.data is empty: name at least one source of prompts")
    if not record.trains and record.rows is not None and not stage["data"]:
        raise UserError(f"{path}.data is empty: a {kind} stage needs prompts")
    if record.produces == "dataset" and stage.get("eval"):
        raise UserError(f"{path}.eval: a {kind} stage produces a dataset, not a model to evaluate; add an eval "
                        f"block to the stage that trains on it")
    for where, block in ((path, stage), (f"{path}.eval", stage.get("eval"))):
        if block and block.get("verifier") is not None:
            _check_verifier(f"{where}.verifier", block["verifier"])
    if record.produces == "scorer" and stage.get("eval"):
        raise UserError(f"{path}.eval: a {kind} stage generates nothing to verify; its held-out pairwise "
                        f"accuracy comes from '{path}.heldout'")
    if "heldout" in stage:
        stage["heldout"] = check_sources(f"{path}.heldout", stage["heldout"])
    record.validate(path, stage)
    _check_trainable_values(path, stage)
    if stage["deepspeed"] is not None:
        stage["deepspeed"] = check_table(f"{path}.deepspeed", stage["deepspeed"], partial(schema.SECTIONS["deepspeed"]))
    if stage["rollout"] is not None:
        stage["rollout"] = check_table(f"{path}.rollout", stage["rollout"], partial(schema.SECTIONS["rollout"]))
    if stage.get("lora") is not None:
        stage["lora"] = check_table(f"{path}.lora", stage["lora"], partial(schema.SECTIONS["lora"]))
    return stage


def _check_rollout(run: dict) -> None:
    """Each sampling stage's rollout section (the run's, with the stage's own block over it)."""
    from posttrain_cli.kinds.base import samples
    from posttrain_cli.rollout import select

    for name, stage in run["stages"].items():
        if samples(KINDS[stage["kind"]], stage):
            own = {k: v for k, v in (stage.get("rollout") or {}).items() if v is not None}
            select.check({**run["rollout"], **own},
                         lambda key, own=own, name=name: f"stages.{name}.rollout.{key}" if key in own else f"rollout.{key}")


def _check_report_to(run: dict) -> None:
    names = run["logging"]["report_to"]
    for name in names:
        if name not in schema.TRACKERS:
            close = difflib.get_close_matches(str(name), schema.TRACKERS, n=1)
            raise UserError(f"logging.report_to: '{name}' is not a tracker"
                            + (f"; did you mean '{close[0]}'?" if close else "")
                            + f" (trackers: {', '.join(schema.TRACKERS)})")
        module, extra = schema.TRACKERS[name]
        # SLURM: the plan may run where the job's environment is not; the stage warns there. Asked
        # without importing the module.
        if run["cluster"]["launcher"] == "local" and importlib.util.find_spec(module) is None:
            raise UserError(f"logging.report_to: {name} needs the Python module {module}: "
                            f"pip install 'posttrain[{extra}]'")
    if len(set(names)) != len(names):
        raise UserError(f"logging.report_to={names} names a tracker twice")


def _check_lora(run: dict) -> None:
    """Each training stage's lora section (the run's, with the stage's own block over it)."""
    for name, stage in run["stages"].items():
        if KINDS[stage["kind"]].trains:
            own = {k: v for k, v in (stage.get("lora") or {}).items() if v is not None}
            lora = schema.stage_lora(run, stage)
            if lora is not None:
                _check_lora_values(lora, run["cluster"]["launcher"], schema.stage_deepspeed(run, stage)["zero_stage"],
                                   lambda key, own=own, name=name: f"stages.{name}.lora.{key}" if key in own else f"lora.{key}")


def _check_lora_values(lora: dict, launcher: str, zero_stage: int, where) -> None:
    if lora["r"] < 1:
        raise UserError(f"{where('r')}={lora['r']} must be >= 1 (null: no adapter)")
    if lora["alpha"] is not None and lora["alpha"] <= 0:
        raise UserError(f"{where('alpha')}={lora['alpha']} must be > 0")
    if not 0 <= lora["dropout"] < 1:
        raise UserError(f"{where('dropout')}={lora['dropout']} must be in [0, 1)")
    targets = lora["target_modules"]
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise UserError(f"{where('target_modules')}={targets!r} must be all-linear or a list of module names "
                        f"(q_proj, v_proj, ...)")
    if isinstance(targets, str) and targets != "all-linear":
        raise UserError(f"{where('target_modules')}={targets!r}: all-linear, or a list of module names "
                        f"([{targets}])")
    if lora["modules_to_save"] is not None and not all(isinstance(m, str) and m for m in lora["modules_to_save"]):
        raise UserError(f"{where('modules_to_save')}={lora['modules_to_save']!r} must be a list of module names")
    if lora["quantize"] is not None:
        if lora["quantize"] != "4bit":
            raise UserError(f"{where('quantize')}={lora['quantize']!r}: 4bit or null")
        # SLURM: the plan runs on a login node; the job's node has the GPU (the worker checks there).
        if launcher == "local" and not has_cuda():
            raise UserError(f"{where('quantize')}=4bit (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has "
                            f"no CUDA GPU: set {where('quantize')}=null")
        if zero_stage == 3:
            raise UserError(f"{where('quantize')}=4bit keeps the whole 4-bit base on every GPU and shards only the "
                            f"adapter's training state; ZeRO-3 is not supported with it: use deepspeed=zero2, or "
                            f"{where('quantize')}=null")
        if launcher == "local" and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"{where('quantize')}=4bit (QLoRA) needs bitsandbytes: pip install 'posttrain[qlora]'")


def _check_compile(run: dict) -> None:
    """deepspeed.compile on each training stage (the run's deepspeed section, the stage's block over it)."""
    for name, stage in run["stages"].items():
        own = stage.get("deepspeed") or {}
        if not isinstance(own.get("compile", False), (bool, type(None))):
            # A stage's block is checked key by key (config/tables.py partial), not by type.
            raise UserError(f"stages.{name}.deepspeed.compile={own['compile']!r} is not a bool")
        ds = schema.stage_deepspeed(run, stage)
        if not (KINDS[stage["kind"]].trains and ds["compile"]):
            continue
        key = f"stages.{name}.deepspeed.compile" if own.get("compile") else "deepspeed.compile"
        if ds["zero_stage"] == 3:
            zero = f"stages.{name}.deepspeed.zero_stage=2" if own.get("zero_stage") is not None else "deepspeed=zero2"
            raise UserError(f"{key}=true is not supported with ZeRO-3: its parameter-gathering hooks inside every "
                            f"compiled layer break the graph into dozens of pieces that hit torch's recompile "
                            f"limit; use {zero}, or {key}=false")
        # SLURM: the plan runs on a login node; the stage checks its own node (engine/regional_compile.py).
        cuda = has_cuda()
        if run["cluster"]["launcher"] == "local" and compiler_for(cuda=cuda) is None:
            need = "a C compiler for Triton on GPUs" if cuda else "a C++ compiler on CPU"
            raise UserError(f"{key}=true: torch.compile needs {need} and finds none ({', '.join(compilers(cuda))} "
                            f"not found): install one (apt-get install {'gcc' if cuda else 'g++'}) or set {key}=false")


def _check_kernels(run: dict) -> None:
    """deepspeed.kernels=liger: liger-kernel installed, and a CUDA GPU (or Triton's interpreter)."""
    for name, stage in run["stages"].items():
        own = stage.get("deepspeed") or {}
        if schema.stage_deepspeed(run, stage)["kernels"] != "liger" or run["cluster"]["launcher"] != "local":
            continue  # SLURM: the plan runs on a login node; the job's node is checked as the stage loads.
        key = f"stages.{name}.deepspeed.kernels" if own.get("kernels") else "deepspeed.kernels"
        problem = liger_problem(cuda=has_cuda())
        if problem:
            raise UserError(f"{key}=liger: {problem}; or set {key}=torch")


def _check_verifier(path: str, name: str) -> None:
    from posttrain_cli.rewards import VERIFIERS  # pure Python, no torch

    if name not in VERIFIERS:
        close = difflib.get_close_matches(name, list(VERIFIERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{path}='{name}' is not a verifier (known: {', '.join(sorted(VERIFIERS))}){hint}")


def _check_has_template(path: str, stages: dict) -> None:
    """A local base model without a chat template stops here (a hub model is checked when its
    tokenizer loads); a recipe whose stages read no rows (merges only) renders no chat."""
    import json
    from pathlib import Path

    from posttrain_cli.data.chat import TEMPLATE_NAMES

    local = Path(path).expanduser()
    if not (local / "config.json").is_file() or all(KINDS[s["kind"]].rows is None for s in stages.values()):
        return
    if (local / "chat_template.jinja").is_file() or (local / "chat_template.json").is_file():
        return
    try:
        if json.loads((local / "tokenizer_config.json").read_text()).get("chat_template"):
            return
    except (OSError, ValueError):
        return  # no readable tokenizer config: the tokenizer's own load will say what is wrong
    raise UserError(f"model.chat_template: {path} has no chat template (a base model?); set model.chat_template "
                    f"to one of {', '.join(TEMPLATE_NAMES)}, a .jinja file or a template string")


def check_run(cfg: dict) -> dict:
    """Validate a composed recipe (plain dict) and fill every default."""
    for key in cfg:
        if key not in schema.TOP:
            raise UserError(f"unknown key '{key}'{_suggest(key, schema.TOP)}")
    out = {}
    for key, (typ, default) in schema.TOP.items():
        if typ == "section":
            out[key] = check_table(key, cfg.get(key) or {}, schema.SECTIONS[key])
        elif typ == "stages":
            stages = cfg.get("stages")
            if not stages:
                raise UserError("the recipe has no stages: add at least one under 'stages:'")
            if not isinstance(stages, dict):
                raise UserError("'stages' must be a mapping of stage name to stage")
            for n in stages:
                if "." in str(n) or "/" in str(n):
                    raise UserError(f"stages.{n}: a stage name may not contain '.' or '/' (dotted names "
                                    f"are those of rounds: r1.dpo)")
            from posttrain_cli.config import rounds

            stages, blocks = rounds.expand({str(n): s for n, s in stages.items()}, check_stage, check_table)
            out[key] = {n: check_stage(n, s) for n, s in stages.items()}
            rounds.resolve_last(out[key], blocks)
        elif key in cfg:
            out[key] = _coerce(key, cfg[key], typ)
        elif default is REQUIRED:
            raise UserError(f"'{key}' is required at the top of the recipe")
        else:
            out[key] = default
    c = out["cluster"]
    if c["launcher"] == "local" and c["nproc_per_node"] is None:
        raise UserError("cluster.nproc_per_node=null: cluster=local needs a rank count (1, or the GPUs to use)")
    for key in ("nproc_per_node", "nnodes", "parallel_stages", "nodes"):
        if c[key] is not None and c[key] < 1:
            raise UserError(f"cluster.{key}={c[key]} must be >= 1")
    if c["gpus_per_node"] < 0 or c["signal_seconds"] < 0:
        key = "gpus_per_node" if c["gpus_per_node"] < 0 else "signal_seconds"
        raise UserError(f"cluster.{key}={c[key]} must be >= 0")
    _check_seed(out["seed"])
    _check_rollout(out)
    _check_lora(out)
    _check_compile(out)
    _check_kernels(out)
    _check_report_to(out)
    if out["model"]["tiny"] is not None and out["model"]["path"] != "tiny":
        out["model"]["tiny"] = None
    _check_run_dir(out["run_dir"])
    _check_tiny_arch(out["model"])
    template = out["model"]["chat_template"]
    if template is None:
        _check_has_template(out["model"]["path"], out["stages"])
    else:
        from pathlib import Path

        from posttrain_cli.data.chat import template_text

        template_text(template)  # a bad name or a missing file stops here, naming the key
        if not ("{{" in template or "{%" in template) and Path(template).expanduser().is_file():
            # A file: the stage workers (SLURM jobs too) may start elsewhere.
            out["model"]["chat_template"] = str(Path(template).expanduser().resolve())
    return out


# ------------------------------------------------------------------ values that cannot train

# numpy seeds 0 .. 2**32 - 1, the narrowest range of the generators a stage seeds (random, numpy,
# torch); torch's 64 bits then also hold the seeds derived from it (seed x 1,000,003 + rank).
MAX_SEED = 2**32 - 1
# Sequences in one batch of any kind (and counts that multiply one): 2**24 is a thousand times the
# largest published global batch (DeepSeek-V3: 15,360 sequences); a step's indices live in memory.
MAX_SEQUENCES = 2**24
SEQUENCE_KEYS = ("global_batch_size", "micro_batch_size", "prompts_per_step", "rollout_batch_size", "batch_size",
                 "num_generations", "num_samples", "mini_batches", "ppo_epochs")
# Tokens in one sequence, and in one forward (micro_batch_size x max_seq_len): token offsets are
# int32 (flash-attention's cu_seqlens, packed rows' positions).
MAX_TOKENS = 2**31 - 1
TOKEN_KEYS = ("max_seq_len", "max_new_tokens")
# Optimizer steps and passes over the data past any run (Llama 3 pre-trained for about 1.2M steps).
MAX_STEPS = 10**8
MAX_EPOCHS = 10**6
# The optimizer takes its hyperparameters as float32 (torch's AdamW: "value cannot be converted to
# type float without overflow" past this).
FLOAT32_MAX = 3.4028234663852886e38
OPTIMIZER_KEYS = ("lr", "value_lr", "adam_eps", "weight_decay")


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed={seed} is outside 0..{MAX_SEED} (2**32 - 1, numpy's seed range, the narrowest "
                        f"of the generators a stage seeds)")


def _nonfinite(path: str, value) -> str | None:
    """The full key of the first nan or inf under `value` (mappings and lists walked), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path}={value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, v in items:
        found = _nonfinite(f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}", v)
        if found:
            return found
    return None


def _check_trainable_values(path: str, stage: dict) -> None:
    """Numbers no run can train with, refused at plan time (exit 2) naming the full key: a nan or
    inf anywhere in the stage, an lr that is not positive, Adam betas outside [0, 1), eps <= 0, a
    negative weight decay, batch sizes and lengths no machine holds, step counts past any run. A
    finite lr that still diverges is caught while training (engine/loop.py)."""
    found = _nonfinite(path, stage)
    if found:
        raise UserError(f"{found}: not a finite number (nan and inf cannot train)")

    def bad(key: str, why: str):
        return UserError(f"{path}.{key}={stage[key]} {why}")

    for key in SEQUENCE_KEYS:
        if isinstance(stage.get(key), int) and stage[key] > MAX_SEQUENCES:
            raise bad(key, f"is more sequences than any machine holds in one batch (at most {MAX_SEQUENCES:,})")
    for key in TOKEN_KEYS:
        if isinstance(stage.get(key), int) and stage[key] > MAX_TOKENS:
            raise bad(key, f"is more tokens than a sequence can have (at most {MAX_TOKENS:,}, int32 offsets)")
    ev = stage.get("eval") or {}
    for key, limit in (("batch_size", MAX_SEQUENCES), ("max_new_tokens", MAX_TOKENS)):
        if isinstance(ev.get(key), int) and ev[key] > limit:
            raise UserError(f"{path}.eval.{key}={ev[key]} is past any machine (at most {limit:,})")
    if (stage.get("prompts_per_step") or 0) * (stage.get("num_generations") or 0) > MAX_SEQUENCES:
        raise UserError(f"{path}: prompts_per_step {stage['prompts_per_step']} x num_generations "
                        f"{stage['num_generations']} is more sequences than any machine holds in one rollout "
                        f"(at most {MAX_SEQUENCES:,})")
    micro, length = stage.get("micro_batch_size"), stage.get("max_seq_len")
    if micro and length and micro > 0 and length > 0 and micro * length > MAX_TOKENS:
        raise UserError(f"{path}: micro_batch_size {micro} x max_seq_len {length} = {micro * length:,} tokens in one "
                        f"forward, past int32 token offsets ({MAX_TOKENS:,})")
    g = stage.get("global_batch_size")
    if micro and g and 0 < g < micro:
        raise bad("micro_batch_size", f"is more than global_batch_size={g} (sequences per optimizer step, all "
                                      f"ranks): lower micro_batch_size or raise global_batch_size")
    if not KINDS[stage["kind"]].trains:
        return
    for key in ("lr", "value_lr"):
        if stage.get(key) is not None and stage[key] <= 0:
            raise bad(key, "must be > 0")
    for key in OPTIMIZER_KEYS:
        if stage.get(key) is not None and stage[key] > FLOAT32_MAX:
            raise bad(key, f"is past float32's largest value ({FLOAT32_MAX:.4g}), in which the optimizer computes")
    betas = stage["adam_betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise bad("adam_betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if stage["adam_eps"] <= 0:
        raise bad("adam_eps", "must be > 0, e.g. 1.0e-8")
    if stage["weight_decay"] < 0:
        raise bad("weight_decay", "must be >= 0")
    if stage["grad_clip"] is not None and stage["grad_clip"] < 0:
        raise bad("grad_clip", "must be >= 0 (0 or null: no clipping)")
    if not 0 <= stage["min_lr_ratio"] <= 1:
        raise bad("min_lr_ratio", "must be in [0, 1]")
    if stage["epochs"] is not None and not 0 <= stage["epochs"] <= MAX_EPOCHS:
        raise bad("epochs", f"must be between 0 and {MAX_EPOCHS:,} passes over the data")
    if stage["max_steps"] is not None and not 0 < stage["max_steps"] <= MAX_STEPS:
        raise bad("max_steps", f"must be in 1..{MAX_STEPS:,} optimizer steps")
    if not 0 <= stage["nonfinite_patience"] <= MAX_STEPS:
        raise bad("nonfinite_patience", "must be >= 0 (non-finite steps in a row tolerated; 0: stop at the first)")


# ------------------------------------------------------------------ where the run writes, what it builds


def _check_run_dir(run_dir: str) -> None:
    """run_dir names a directory of its own: empty (`run_dir=$UNSET`) would write into the current
    directory, `/` into the filesystem root. Whether it can be written is the runner's check."""
    from pathlib import Path

    if not str(run_dir).strip():
        raise UserError("run_dir is empty (an unset shell variable?); name the run's directory, e.g. "
                        "run_dir=runs/my_run")
    if Path(run_dir).expanduser().resolve() == Path("/"):
        raise UserError(f"run_dir={run_dir} is the filesystem root; name the run's own directory, e.g. "
                        f"run_dir=runs/my_run")


def _check_tiny_arch(model: dict) -> None:
    """model.tiny (the tiny model's architecture): known keys, positive whole numbers; a misspelt key
    would otherwise build the default architecture without a word."""
    from posttrain_cli.models.tiny import DEFAULT_ARCH

    arch = model.get("tiny")
    if arch is None or model["path"] != "tiny":
        return
    if not isinstance(arch, dict):
        raise UserError(f"model.tiny must be a mapping of {', '.join(DEFAULT_ARCH)}, got {arch!r}")
    for key, value in arch.items():
        if key not in DEFAULT_ARCH:
            close = difflib.get_close_matches(str(key), list(DEFAULT_ARCH), n=1)
            raise UserError(f"model.tiny.{key}: unknown key" + (f"; did you mean '{close[0]}'?" if close else "") +
                            f" (the tiny model's keys: {', '.join(DEFAULT_ARCH)})")
        low = 0 if key == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"model.tiny.{key}={value!r} must be a whole number >= {low}")
    full = {**DEFAULT_ARCH, **arch}
    if full["hidden_size"] % full["num_attention_heads"]:
        raise UserError(f"model.tiny.hidden_size={full['hidden_size']} must be a multiple of "
                        f"num_attention_heads={full['num_attention_heads']}")
