"""`scale=tiny`: any recipe's stage graph on the tiny model, the shipped tiny data and a few steps.

    posttrain run recipe=tulu3 scale=tiny          # every stage of Tulu 3, on 2 CPU cores
    posttrain plan recipe=llama3 scale=tiny        # what it swaps in, stage by stage

The graph (stages, `from`, references, rounds, merges, teachers) and the method's settings
(losses, betas, KL estimators and coefficients, clipping, advantage options, learning rates,
schedules) stay as the recipe has them. What scales down:

- the model: the `tiny` group (conf/model/tiny.yaml) with its own chat template (a recipe's
  model.chat_template names markers the character vocabulary may lack; an override after
  scale=tiny sets one: `scale=tiny model.chat_template=tulu`); DeepSpeed offload is switched off;
- data: every `{path: ...}` source (and a required data slot, `???`) becomes the tiny data of
  the stage's kind (its record's tiny_data, posttrain_cli/kinds/); `{from: <stage>}` sources
  stay, so a rejection-sampled dataset still feeds its SFT; eval blocks and held-out sets likewise;
- sizes: steps, batches, sequence lengths, samples per prompt, prompt counts (the record's
  tiny_sizes and tiny_caps).

Rows of the tiny data carry `dataset: add` (or `sub`), which no verifier is named after: stages
that score with verifiers (grpo; others when they name one) get `verifiers: {add: number, sub:
number}` next to theirs; a stage scored by a reward model alone stays so. A `distill` stage's
teachers take the tiny domains in order (the first teacher `add`, the second `sub`).
`rejection_sampling` with `keep: all_pass` keeps the best instead: a model trained a few steps
passes nothing, and a stage that keeps nothing is an error.

A recipe may add a `tiny:` block (same shape as the recipe: `tiny: {stages: {sft: {...}}}`),
merged last at tiny scale and ignored otherwise; shell overrides apply after both.
Only the standard library, yaml and the kind records are used here (no torch).
"""

from __future__ import annotations

import copy
from pathlib import Path

from posttrain_cli.kinds import KINDS
from posttrain_cli.kinds.base import TINY_DOMAINS, TINY_EVAL

DATA = "pkg://posttrain_cli/data/tiny/"

# Each kind's tiny data, sizes and caps are its record's (kinds/: tiny_data, tiny_heldout,
# tiny_sizes, tiny_caps, and a `tiny` hook for the rest).
TINY_VERIFIERS = {d: "number" for d in TINY_DOMAINS}
EVAL_SIZES = {"max_new_tokens": 8, "batch_size": 32, "limit": 32, "verifier": "number"}
# Keys counted in tokens or steps that must stay below the tiny lengths.
_SMALL = {"overlong_buffer": 2, "ref_refresh_every": 2, "eval_every": 2}


def _sources(files: list[str]) -> list[dict]:
    return [{"path": DATA + f} for f in files]


def _data(value, files: list[str]) -> list:
    """Path sources (and a missing slot) -> the tiny files; `from` sources stay."""
    if not isinstance(value, list):
        return _sources(files)
    kept = [s for s in value if isinstance(s, dict) and s.get("from")]
    has_paths = any(not (isinstance(s, dict) and s.get("from")) for s in value)
    return kept + (_sources(files) if has_paths or not kept else [])


def tiny_stage(stage: dict) -> dict:
    """One stage (or a rounds block) at tiny scale."""
    kind = stage.get("kind")
    out = dict(stage)
    if kind == "rounds":
        if isinstance(stage.get("stages"), dict):
            out["stages"] = {n: tiny_stage(s) if isinstance(s, dict) else s for n, s in stage["stages"].items()}
        return out
    record = KINDS.get(kind)
    if record is None:
        return out
    if record.tiny_data:
        out["data"] = _data(stage.get("data"), list(record.tiny_data))
    if record.tiny_heldout and stage.get("heldout"):
        out["heldout"] = _sources(list(record.tiny_heldout))
    out.update(record.tiny_sizes)
    for key, (low, high) in record.tiny_caps.items():
        value = stage.get(key, record.schema[key][1])
        out[key] = max(low, min(high, value))
    for key, small in _SMALL.items():
        if stage.get(key) is not None:
            out[key] = small
    out.pop("epochs", None)
    out.pop("resources", None)
    if "verifiers" in record.schema and record.uses_verifiers(stage):
        out["verifiers"] = {**TINY_VERIFIERS, **(stage.get("verifiers") or {})}
    if record.tiny is not None:
        record.tiny(stage, out)
    if isinstance(stage.get("eval"), dict):
        out["eval"] = {**stage["eval"], "data": _sources([TINY_EVAL]), **EVAL_SIZES}
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_tiny(cfg: dict, conf_dir: Path) -> dict:
    """A composed recipe (a plain dict, interpolations unresolved) at tiny scale."""
    import yaml

    out = copy.deepcopy(cfg)
    block = out.pop("tiny", None) or {}
    model = yaml.safe_load((conf_dir / "model" / "tiny.yaml").read_text())
    out["model"] = {**{k: v for k, v in (cfg.get("model") or {}).items() if k in ("trust_remote_code",)},
                    **model}
    ds = dict(out.get("deepspeed") or {})
    ds.update(offload_optimizer=False, offload_param=False)
    out["deepspeed"] = ds
    stages = out.get("stages")
    if isinstance(stages, dict):
        for name, stage in stages.items():
            if isinstance(stage, dict):
                stage = tiny_stage(stage)
                if isinstance(stage.get("deepspeed"), dict):
                    stage["deepspeed"] = {**stage["deepspeed"], "offload_optimizer": False, "offload_param": False}
                stages[name] = stage
    return _merge(out, block)
