"""The record of a stage kind, the key tables kinds share, and the rules they share.

A `Kind` holds every fact about a kind that code outside its run module needs: its keys, its
validation, what it produces and reads, its batch arithmetic, how it shrinks at `scale=tiny`
and what `posttrain plan` prints for it. The schema, validation, scale, plan, the stage table
and the stage graph loop over the records (kinds/__init__.py: KINDS); none branches on a name.

Torch-free: `posttrain plan` imports every record. Rewards and data helpers are imported inside
the functions that need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from posttrain_cli.errors import UserError

# A key spec is (type, default). Types: "str", "int", "float", "bool", "list",
# "dict", "any"; "?x" allows null; a tuple of strings is a choice.
REQUIRED = object()

# What a stage kind's output is: a policy (a causal LM a later `from` may name), a scorer (a
# sequence-classification model), a dataset (RUN_DIR/<stage>/data.jsonl), or None (metrics only).
PRODUCES = ("policy", "scorer", "dataset", None)
MODELS = frozenset({"policy", "scorer"})
POLICY = frozenset({"policy"})
SCORER = frozenset({"scorer"})

# What `plan` prints after "out:" for each kind of output.
OUTPUTS = {"policy": "model/", "scorer": "model/ (a reward model: AutoModelForSequenceClassification)",
           "dataset": "data.jsonl (SFT rows)", None: "metrics only"}


def _no_rules(path: str, stage: dict) -> None:
    return None


def no_batch(path: str, stage: dict, world_size: int) -> dict:
    """A kind that trains nothing: only its rank count."""
    return {"world_size": world_size}


def names_a_verifier(cfg: dict) -> bool:
    """Whether a stage names a verifier (verifier, verifiers or extra_verifiers)."""
    return bool(cfg.get("verifier") or cfg.get("verifiers") or cfg.get("extra_verifiers"))


def _no_row_check(cfg: dict, rows: list, where: str) -> None:
    return None


def _no_lines(cfg: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class Kind:
    name: str
    # Its keys: {key: (type, default)}.
    schema: dict[str, tuple]
    # Where its `run(ctx)` lives; imported only inside the stage worker.
    module: str
    # "policy" | "scorer" | "dataset" | None (PRODUCES).
    produces: str | None
    # The row schema (data/schemas.py: ROW_SCHEMAS) of its `data`; None: it reads no data.
    rows: str | None
    # The row schema of its output dataset (RUN_DIR/<stage>/data.jsonl).
    output_rows: str | None = None
    # False: its models come from its own keys (merge: models, base), not `from`.
    has_from: bool = True
    # What a stage named by its `from` may produce.
    from_accepts: frozenset = POLICY
    # Keys (besides `from`) that name another model, a stage or a path: {key: what it may produce}.
    # A list (models) or a mapping (teachers) names several; each entry is checked.
    model_refs: dict[str, frozenset] = field(default_factory=dict)
    # It trains a model; and samples its own data (its batch is counted in rollouts).
    trains: bool = False
    rl: bool = False
    # It samples from a model without training it (generate, rejection_sampling, eval); with `rl`
    # and an eval block, what decides whether the rollout section applies to a stage.
    samples: bool = False
    # validate(path, stage): UserError for a bad value, after the table and sources are checked.
    validate: Callable[[str, dict], None] = _no_rules
    # batch(path, stage, world_size) -> the batch arithmetic plan and the workers use.
    batch: Callable[[str, dict, int], dict] = no_batch
    # uses_verifiers(cfg): whether the stage scores with verifiers (rewards/dispatch.py Rewards).
    uses_verifiers: Callable[[dict], bool] = names_a_verifier
    # check_rows(cfg, rows, where): pre-flight of the rows it scores or routes (UserError naming a row).
    check_rows: Callable[[dict, list, str], None] = _no_row_check
    # describe(cfg) -> the lines `plan` prints for it (rich markup), after the shared ones.
    describe: Callable[[dict], list[str]] = _no_lines
    # scale=tiny (config/scale.py): the tiny files its data (and held-out set) become, the sizes
    # it takes (`=`), the keys capped to [low, high], and a hook(stage, out) for the rest.
    tiny_data: tuple[str, ...] = ()
    tiny_heldout: tuple[str, ...] = ()
    tiny_sizes: dict[str, Any] = field(default_factory=dict)
    tiny_caps: dict[str, tuple] = field(default_factory=dict)
    tiny: Callable[[dict, dict], None] | None = None

    @property
    def out(self) -> str:
        """What `plan` prints after "out: RUN_DIR/<stage>/"."""
        return OUTPUTS[self.produces]


# ------------------------------------------------------------------ shared key tables

# A stage's eval block (the eval kind takes all but `before`).
EVAL = {
    "data": ("list", REQUIRED),
    # A verifier from posttrain_cli.rewards (exact, number, ...).
    "verifier": ("str", "number"),
    # Also evaluate the stage's input model, for a before/after pair.
    "before": ("bool", False),
    "max_new_tokens": ("int", 32),
    # Prompts per rank per generate call.
    "batch_size": ("int", 64),
    # 0 is greedy.
    "temperature": ("float", 0.0),
    "top_p": ("float", 1.0),
    # Evaluate only the first N prompts.
    "limit": ("?int", None),
    # Also score the generations with a reward model: a reward_model stage's name or a path.
    "reward_model": ("?str", None),
}
# Keys of an eval block that name a model, and what each may name.
EVAL_MODEL_REFS = {"reward_model": SCORER}

COMMON = {
    "kind": ("str", REQUIRED),
    "from": ("?str", None),
    "data": ("list", []),
    "eval": ("?eval", None),
    "resources": ("?resources", None),
    # Per-stage override of the deepspeed section.
    "deepspeed": ("?dict", None),
    # Per-stage override of the rollout section (what samples: the stage's own and its eval block's).
    "rollout": ("?dict", None),
}

TRAINING = {
    "lr": ("float", 1.0e-5),
    "epochs": ("?float", 1.0),
    # When set, wins over epochs.
    "max_steps": ("?int", None),
    "global_batch_size": ("int", 64),
    # Sequences per rank in one forward; null: the rank's whole share of the step (no accumulation),
    # whatever the rank count (the tiny recipes use it).
    "micro_batch_size": ("?int", 8),
    "max_seq_len": ("int", 2048),
    "schedule": (("constant", "linear", "cosine"), "linear"),
    "warmup_ratio": ("float", 0.03),
    # Cosine decays to this fraction of lr.
    "min_lr_ratio": ("float", 0.0),
    "weight_decay": ("float", 0.0),
    "adam_betas": ("list", [0.9, 0.999]),
    "adam_eps": ("float", 1.0e-8),
    "grad_clip": ("?float", 1.0),
    # A checkpoint (weights, optimizer, schedule, RNG, data position) every N optimizer steps (RL
    # kinds: rollout steps) and on SIGUSR1 / SIGTERM; a re-run resumes from it. null: on a signal only.
    "save_every": ("?int", 500),
    # Optimizer steps in a row whose loss or gradient norm may be non-finite (nan / inf) before the
    # stage stops, keeping its last good checkpoint and publishing nothing (engine/loop.py). 0: stop
    # at the first. Not in the fingerprint: a completed stage's weights do not depend on it.
    "nonfinite_patience": ("int", 0),
    # Per-stage override of the lora section (LoRA adapters; off unless r is set).
    "lora": ("?dict", None),
}
# The RL kinds count their batch in rollouts (RL: prompts_per_step) and their length in passes
# over the prompts (their own `epochs`).
RL_TRAINING = {k: v for k, v in TRAINING.items() if k not in ("global_batch_size", "epochs")}

# Both preference kinds read preference rows (data/schemas.py: preference_row).
PREFERENCE = {
    # Held-out preference rows: pairwise accuracy and margin before and after training.
    "heldout": ("list", []),
    # An answer over max_seq_len: truncate it (keep the start) or drop the row.
    "truncation": (("truncate", "drop"), "truncate"),
}

# Names of the KL estimators (posttrain_cli.losses.rl), for torch-free checks (a test keeps them equal).
KL_ESTIMATORS = ("k1", "k2", "k3")

# What the on-policy RL kinds share: rollout, rewards, KL to a reference.
RL = {
    # Prompts per step, all ranks together (a multiple of the rank count).
    "prompts_per_step": ("int", 64),
    # Completions sampled per prompt (the GRPO group; PPO samples this many too).
    "num_generations": ("int", 8),
    # Optimizer updates per rollout batch: the batch splits into this many mini-batches.
    "mini_batches": ("int", 1),
    "max_new_tokens": ("int", 256),
    "temperature": ("float", 1.0),
    "top_p": ("float", 1.0),
    # Sequences per rank per generate call.
    "rollout_batch_size": ("int", 64),
    # Rewards (posttrain_cli/rewards/routing.py): a row's verifier comes from `verifiers`
    # (its `dataset` value -> name or names), else its dataset when that names a verifier
    # (gsm8k, math, ifeval, ...), else `verifier`; `extra_verifiers` apply to every row (R1: [format]).
    "verifier": ("?str", None),
    "verifiers": ("dict", {}),
    "extra_verifiers": ("list", []),
    # Weight of each verifier's score in the reward (default 1).
    "reward_weights": ("dict", {}),
    # Seconds per verifier call; a verifier that raises or times out scores 0 (counted).
    "verifier_timeout": ("float", 10.0),
    # The reward of a completion that hit max_new_tokens without EOS (Tulu 3: -10); null: unchanged.
    "no_eos_penalty": ("?float", None),
    # A rollout step costs minutes at scale: checkpoint more often than the trainers' 500.
    "save_every": ("?int", 50),
    # KL to the reference: beta 0 loads no reference.
    "beta": ("float", 0.0),
    "kl_estimator": (KL_ESTIMATORS, "k3"),
    # The reference model: a stage or a path; null is the stage's input model.
    "ref_from": ("?str", None),
    # When another engine samples (rollout.backend vllm), its log-probs differ a little from the
    # trainer's: the trainer recomputes its own for the ratio, and each token's loss is weighted by
    # the truncated importance weight min(p_trainer / p_sampler, is_cap) (truncated IS, as OLMo 3
    # and MiMo). null: no weight.
    "is_cap": ("?float", 2.0),
}

# The verifier keys of RL (dispatch.py), for the other kinds that score with verifiers.
VERIFIER_KEYS = ("verifier", "verifiers", "extra_verifiers", "reward_weights", "verifier_timeout")

# Sampling from a model into a dataset (generate, rejection_sampling).
GENERATION = {
    "max_new_tokens": ("int", 256),
    "temperature": ("float", 1.0),
    "top_p": ("float", 1.0),
    # Sequences per rank per generate call.
    "batch_size": ("int", 64),
    # Prompt + completion; prompts leaving no room for max_new_tokens are dropped (counted).
    "max_seq_len": ("int", 2048),
    # Use only the first N prompts.
    "limit": ("?int", None),
    # Completions cut at max_new_tokens (no EOS) are left out of the dataset.
    "drop_truncated": ("bool", True),
}

# ------------------------------------------------------------------ scale=tiny

# The tiny files (posttrain_cli/data/tiny/) each row schema comes in.
TINY_SFT, TINY_PREF, TINY_PROMPTS, TINY_EVAL = "sft_train.jsonl", "pref_train.jsonl", "rl_train.jsonl", "sft_eval.jsonl"
TINY_PREF_EVAL = "pref_eval.jsonl"
# The tiny domains (a row's `dataset`), in the order a distill stage's teachers take them.
TINY_DOMAINS = ("add", "sub")
# Sizes at tiny scale: set (`=`) per key.
# micro_batch_size null: the step's share of each rank, so a tiny run fits any rank count.
TINY_TRAIN = {"global_batch_size": 16, "micro_batch_size": None, "max_seq_len": 64}
# RL: 8 prompts per step; an update (a mini-batch) may hold as few as 4 sequences, split over 2 ranks.
TINY_RL = {"prompts_per_step": 8, "rollout_batch_size": 32, "micro_batch_size": None, "max_seq_len": 64,
           "max_new_tokens": 8}
# A model trained a few steps rarely ends its answer: keep the completions cut at max_new_tokens.
TINY_GENERATION = {"max_new_tokens": 8, "batch_size": 32, "max_seq_len": 64, "limit": 16, "drop_truncated": False}

# ------------------------------------------------------------------ shared rules


def positive(path: str, stage: dict, keys) -> None:
    for key in keys:
        if stage[key] is not None and stage[key] <= 0:
            raise UserError(f"{path}.{key}={stage[key]} must be > 0")


def model_names(path: str, value, what: str) -> None:
    bad = next((v for v in value if not isinstance(v, str) or not v), None) if value else None
    if bad is not None:
        raise UserError(f"{path}: {what} must be stage names or model paths, got {bad!r}")


def check_sampling(path: str, stage: dict) -> None:
    if stage["temperature"] < 0 or not 0 < stage["top_p"] <= 1:
        raise UserError(f"{path}: temperature must be >= 0 and top_p in (0, 1]")


def check_training(path: str, stage: dict) -> None:
    """Every kind that trains: data, positive sizes, a length, a warm-up fraction."""
    if not stage["data"]:
        raise UserError(f"{path}.data is empty: a {stage['kind']} stage needs at least one source")
    for key in ("lr", "global_batch_size", "micro_batch_size", "max_seq_len"):
        if stage.get(key) is not None and stage[key] <= 0:
            raise UserError(f"{path}.{key}={stage[key]} must be > 0")
    if stage["max_steps"] is None and (stage["epochs"] is None or stage["epochs"] <= 0):
        raise UserError(f"{path}: set epochs > 0 or max_steps")
    if stage["max_steps"] is not None and stage["max_steps"] <= 0:
        raise UserError(f"{path}.max_steps={stage['max_steps']} must be > 0")
    if not 0 <= stage["warmup_ratio"] < 1:
        raise UserError(f"{path}.warmup_ratio={stage['warmup_ratio']} must be in [0, 1)")


def check_rl(path: str, stage: dict) -> None:
    """Every on-policy kind (after check_training): rollout sizes, sampling, the KL weight."""
    for key in ("prompts_per_step", "num_generations", "mini_batches", "max_new_tokens", "rollout_batch_size"):
        if stage[key] <= 0:
            raise UserError(f"{path}.{key}={stage[key]} must be > 0")
    check_sampling(path, stage)
    positive(path, stage, ("is_cap",))
    if stage.get("beta", 0) < 0:
        raise UserError(f"{path}.beta={stage['beta']} must be >= 0 (0 loads no reference)")


def check_generation(path: str, stage: dict) -> None:
    """Every kind that samples a dataset: positive sizes, sampling."""
    positive(path, stage, ("max_new_tokens", "batch_size", "max_seq_len", "limit"))
    check_sampling(path, stage)


def check_verifiers(path: str, stage: dict) -> None:
    """The stage's verifier keys name installed verifiers with sane weights and timeout."""
    from posttrain_cli.rewards import dispatch  # pure Python, no torch

    dispatch.check_config(stage, path)


def check_verifier_rows(cfg: dict, rows: list, where: str, *, suggest_reward_model: bool = False) -> None:
    """Pre-flight: every row resolves to a verifier that has the fields it reads."""
    from posttrain_cli.rewards.dispatch import Rewards  # pure Python, no torch

    Rewards(cfg, where=where, suggest_reward_model=suggest_reward_model).check_rows(rows)


# ------------------------------------------------------------------ shared plan text


def verifier_names(cfg: dict) -> list[str]:
    """A stage's verifiers as plan shows them: dataset->name, the default, +extra."""
    return ([f"{k}->{v}" for k, v in cfg["verifiers"].items()] + ([cfg["verifier"]] if cfg["verifier"] else [])
            + [f"+{v}" for v in cfg["extra_verifiers"]])


def rl_reward_line(cfg: dict, verifier_scale: str = "") -> str:
    """An RL stage's reward (reward model and / or verifiers) and KL, as plan shows them."""
    rewards = []
    if cfg.get("reward_model"):
        rewards.append(f"{cfg['rm_weight']:g} x reward model {cfg['reward_model']}")
    names = verifier_names(cfg)
    if names:
        rewards.append(f"{verifier_scale}verifiers {', '.join(names)}")
    kl = (f"beta {cfg['beta']:g} ({cfg['kl_estimator']}), reference {cfg['ref_from'] or 'the input model'}"
          if cfg["beta"] else "beta 0 (no reference)")
    return (f"   reward: {'; '.join(rewards)}"
            + (f"; no-EOS penalty {cfg['no_eos_penalty']:g}" if cfg["no_eos_penalty"] is not None else "")
            + f"; KL: {kl}")


def samples(kind: Kind, cfg: dict) -> bool:
    """Whether a stage samples from a model (its own sampling or its eval block's)."""
    return kind.rl or kind.samples or bool(cfg.get("eval"))


def sampling_line(cfg: dict, per_prompt: int) -> str:
    """A dataset kind's sampling, as plan shows it."""
    return (f"   sampling: {per_prompt} completion(s) per prompt, max_new_tokens {cfg['max_new_tokens']}, "
            f"temperature {cfg['temperature']:g}, top_p {cfg['top_p']:g}"
            + (", truncated completions dropped" if cfg["drop_truncated"] else "")
            + (f", first {cfg['limit']} prompts" if cfg["limit"] else ""))
