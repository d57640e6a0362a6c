"""`scale=tiny`: any recipe's stage graph on the tiny model, the shipped tiny data and a few steps.

    posttrain run recipe=tulu3 scale=tiny          # every stage of Tulu 3, on 2 CPU cores
    posttrain plan recipe=llama3 scale=tiny        # what it swaps in, stage by stage

The graph (stages, `from`, references, rounds, merges, teachers) and the method's settings
(losses, betas, KL estimators and coefficients, clipping, advantage options, learning rates,
schedules) stay as the recipe has them. What scales down:

- the model: the `tiny` group (conf/model/tiny.yaml); DeepSpeed offload is switched off;
- data: every `{path: ...}` source (and a required data slot, `???`) becomes the tiny data of
  the stage's kind (TINY_DATA below); `{from: <stage>}` sources stay, so a rejection-sampled
  dataset still feeds its SFT; eval blocks and held-out sets likewise;
- sizes: steps, batches, sequence lengths, samples per prompt, prompt counts (SIZES below).

Rows of the tiny data carry `dataset: add` (or `sub`), which no verifier is named after: stages
that score with verifiers (grpo; others when they name one) get `verifiers: {add: number, sub:
number}` next to theirs; a stage scored by a reward model alone stays so. A `distill` stage's
teachers take the tiny domains in order (the first teacher `add`, the second `sub`).
`rejection_sampling` with `keep: all_pass` keeps the best instead: a model trained a few steps
passes nothing, and a stage that keeps nothing is an error.

A recipe may add a `tiny:` block (same shape as the recipe: `tiny: {stages: {sft: {...}}}`),
merged last at tiny scale and ignored otherwise; shell overrides apply after both.
Only the standard library and yaml are used here (no torch).
"""

from __future__ import annotations

import copy
from pathlib import Path

DATA = "pkg://posttrain_cli/data/tiny/"

# The tiny data each kind reads (its row schema: DATA_ROWS in schema.py).
TINY_DATA = {
    "sft": ["sft_train.jsonl"],
    "reward_model": ["pref_train.jsonl"],
    "dpo": ["pref_train.jsonl"],
    "grpo": ["rl_train.jsonl"],
    "ppo": ["rl_train.jsonl"],
    "rejection_sampling": ["rl_train.jsonl"],
    "generate": ["rl_train.jsonl"],
    "distill": ["rl_train.jsonl", "sub_rl_train.jsonl"],
    "eval": ["sft_eval.jsonl"],
}
TINY_HELDOUT = {
    "reward_model": ["pref_eval.jsonl"],
    "dpo": ["pref_eval.jsonl"],
    "distill": ["sft_eval.jsonl", "sub_eval.jsonl"],
}
# The tiny domains, in the order a distill stage's teachers take them.
DOMAINS = ("add", "sub")
TINY_VERIFIERS = {d: "number" for d in DOMAINS}

# Sizes at tiny scale: set (`=`) or capped (`min`, keeping a smaller recipe value) per key.
_TRAIN = {"global_batch_size": 16, "micro_batch_size": 8, "max_seq_len": 64}
# RL: 8 prompts per step; an update (a mini-batch) may hold as few as 4 sequences, split over 2 ranks.
_RL = {"prompts_per_step": 8, "rollout_batch_size": 32, "micro_batch_size": 2, "max_seq_len": 64,
       "max_new_tokens": 8}
# A model trained a few steps rarely ends its answer: keep the completions cut at max_new_tokens.
_GEN = {"max_new_tokens": 8, "batch_size": 32, "max_seq_len": 64, "limit": 16, "drop_truncated": False}
SIZES = {
    "sft": {"max_steps": 10, **_TRAIN},
    "reward_model": {"max_steps": 5, **_TRAIN},
    "dpo": {"max_steps": 5, **_TRAIN},
    "grpo": {"max_steps": 2, **_RL},
    "ppo": {"max_steps": 2, **_RL},
    "distill": {"max_steps": 2, **_RL},
    "rejection_sampling": dict(_GEN),
    "generate": dict(_GEN),
    "eval": {"max_new_tokens": 8, "batch_size": 32, "limit": 32},
    "merge": {},
}
CAPS = {
    # A GRPO group needs two samples at least.
    "grpo": {"num_generations": (2, 4), "mini_batches": (1, 2), "dynamic_sampling_rounds": (1, 1)},
    "ppo": {"num_generations": (1, 2), "mini_batches": (1, 2), "ppo_epochs": (1, 2)},
    "distill": {"num_generations": (1, 2), "mini_batches": (1, 2)},
    "rejection_sampling": {"num_samples": (2, 4)},
    "generate": {"num_generations": (1, 2)},
}
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
    from posttrain_cli.config.schema import KINDS
    from posttrain_cli.rewards.dispatch import uses_verifiers

    kind = stage.get("kind")
    out = dict(stage)
    if kind == "rounds":
        if isinstance(stage.get("stages"), dict):
            out["stages"] = {n: tiny_stage(s) if isinstance(s, dict) else s for n, s in stage["stages"].items()}
        return out
    if kind not in SIZES:
        return out
    if kind in TINY_DATA:
        out["data"] = _data(stage.get("data"), TINY_DATA[kind])
    if kind in TINY_HELDOUT and stage.get("heldout"):
        out["heldout"] = _sources(TINY_HELDOUT[kind])
    out.update(SIZES[kind])
    for key, (low, high) in CAPS.get(kind, {}).items():
        value = stage.get(key, KINDS[kind][key][1])
        out[key] = max(low, min(high, value))
    for key, small in _SMALL.items():
        if stage.get(key) is not None:
            out[key] = small
    out.pop("epochs", None)
    out.pop("resources", None)
    if kind != "eval" and uses_verifiers(stage):
        out["verifiers"] = {**TINY_VERIFIERS, **(stage.get("verifiers") or {})}
    if kind == "eval":
        out["verifier"] = "number"
    if kind == "rejection_sampling" and stage.get("keep") == "all_pass":
        out.update(keep="best", max_per_prompt=None, threshold=None)
    if kind == "distill" and isinstance(stage.get("teachers"), dict) and stage["teachers"]:
        names = list(stage["teachers"])
        pick = {d: names[min(i, len(names) - 1)] for i, d in enumerate(DOMAINS)}
        out["teachers"] = {d: stage["teachers"][n] for d, n in pick.items()}
        if stage.get("teacher_weights"):
            out["teacher_weights"] = {d: stage["teacher_weights"].get(n, 1.0) for d, n in pick.items()}
    if isinstance(stage.get("eval"), dict):
        out["eval"] = {**stage["eval"], "data": _sources(TINY_DATA["eval"]), **EVAL_SIZES}
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
