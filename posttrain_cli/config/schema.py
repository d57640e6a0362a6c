"""The keys a recipe may set, their types and defaults.

Plain tables, not dataclasses: a stage key is called `from`, and a table gives
the error messages we want ("unknown key stages.sft.lrr; did you mean lr?").
Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

# A key spec is (type, default). Types: "str", "int", "float", "bool", "list",
# "dict", "any"; "?x" allows null; a tuple of strings is a choice.
REQUIRED = object()

TOP = {
    "name": ("str", REQUIRED),
    "description": ("str", ""),
    "run_dir": ("str", REQUIRED),
    "seed": ("int", 0),
    # full: the recipe as written; tiny: its stage graph on the tiny model and data, a few steps
    # per stage (posttrain_cli/config/scale.py).
    "scale": (("full", "tiny"), "full"),
    "model": ("section", None),
    "deepspeed": ("section", None),
    "cluster": ("section", None),
    "logging": ("section", None),
    "stages": ("stages", None),
}

SECTIONS = {
    "model": {
        # A hub id, a local Hugging Face directory, or `tiny` (built locally).
        "path": ("str", REQUIRED),
        "revision": ("?str", None),
        "trust_remote_code": ("bool", False),
        # auto: bf16 on GPUs, fp32 on CPU.
        "dtype": (("auto", "float32", "bfloat16", "float16"), "auto"),
        # null: flash_attention_2 if installed on GPU, else sdpa.
        "attn_implementation": ("?str", None),
        # Architecture of the tiny model (only with path: tiny).
        "tiny": ("?dict", None),
    },
    "deepspeed": {
        "zero_stage": ((0, 1, 2, 3), 2),
        "offload_optimizer": ("bool", False),
        "offload_param": ("bool", False),
        # auto: bf16 on GPUs, fp32 on CPU.
        "precision": (("auto", "fp32", "bf16", "fp16"), "auto"),
        # Raw DeepSpeed config keys merged last, for what the keys above miss.
        "config": ("dict", {}),
    },
    "cluster": {
        # local: this machine (in-process, or torchrun); slurm: one SLURM job per stage.
        "launcher": (("local", "slurm"), "local"),
        # Ranks per node: GPUs, or CPU processes with gloo. slurm: null is one per GPU
        # (gpus_per_node, or 1 without GPUs).
        "nproc_per_node": ("?int", 1),
        # local only (one node).
        "nnodes": ("int", 1),
        "master_port": ("?int", None),
        # Stages that do not depend on each other (branches) run at once, up to this many;
        # on GPUs each running stage gets its own nproc_per_node devices. (slurm: every branch
        # is its own job; the scheduler decides.)
        "parallel_stages": ("int", 1),
        # slurm (conf/cluster/slurm.yaml): what each stage's job asks for; a stage's `resources`
        # block overrides any of them.
        "nodes": ("int", 1),
        "gpus_per_node": ("int", 0),
        "cpus_per_task": ("?int", None),
        "mem": ("?str", None),
        "time": ("?str", None),
        "partition": ("?str", None),
        "account": ("?str", None),
        "qos": ("?str", None),
        "constraint": ("?str", None),
        # Shell lines run before the stage (module loads, environment activation).
        "setup": ("list", []),
        # Extra arguments for srun, and extra #SBATCH options ("--exclusive", "--mail-type=FAIL").
        "srun_args": ("list", []),
        "sbatch_args": ("list", []),
        # Seconds before the time limit at which SLURM sends USR1: the stage saves a checkpoint
        # and requeues itself (0: no warning signal).
        "signal_seconds": ("int", 300),
        "requeue": ("bool", True),
        # The Python that runs the stages on the nodes; null: the one running `posttrain`.
        "python": ("?str", None),
        # --wait: seconds between looks at the queue.
        "poll_seconds": ("float", 10.0),
    },
    "logging": {
        "progress": (("auto", "always", "never"), "auto"),
        "log_every": ("int", 1),
    },
}

SCALES = ("full", "tiny")

SOURCE = {
    "path": ("?str", None),
    "from": ("?str", None),
    "split": ("str", "train"),
    "name": ("?str", None),
    "weight": ("float", 1.0),
}

# A stage's own SLURM resources (cluster=slurm): any of these keys set in a stage's `resources`
# block wins over cluster.<key> for that stage's job.
JOB_KEYS = ("nodes", "gpus_per_node", "nproc_per_node", "cpus_per_task", "mem", "time", "partition", "account",
            "qos", "constraint")
RESOURCES = {k: ("?" + SECTIONS["cluster"][k][0].lstrip("?"), None) for k in JOB_KEYS}

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

COMMON = {
    "kind": ("str", REQUIRED),
    "from": ("?str", None),
    "data": ("list", []),
    "eval": ("?eval", None),
    "resources": ("?resources", None),
    # Per-stage override of the deepspeed section.
    "deepspeed": ("?dict", None),
}

TRAINING = {
    "lr": ("float", 1.0e-5),
    "epochs": ("?float", 1.0),
    # When set, wins over epochs.
    "max_steps": ("?int", None),
    "global_batch_size": ("int", 64),
    "micro_batch_size": ("int", 8),
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
}

# Both preference kinds read preference rows (data/schemas.py: preference_row).
PREFERENCE = {
    # Held-out preference rows: pairwise accuracy and margin before and after training.
    "heldout": ("list", []),
    # An answer over max_seq_len: truncate it (keep the start) or drop the row.
    "truncation": (("truncate", "drop"), "truncate"),
}

# Names of the registered DPO-family losses (posttrain_cli.losses.preference);
# listed here so recipes are checked without importing torch (a test keeps them equal).
DPO_LOSSES = ("dpo", "dpo_norm", "ipo", "simpo", "hinge")

# Names of the RL registries (posttrain_cli.losses.rl), for torch-free checks (a test keeps them equal).
ADV_NORMS = ("group_std", "centered", "none")
LOSS_AGGS = ("seq_mean_token_mean", "token_mean", "constant")
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
    # Rewards (posttrain_cli/rewards/dispatch.py): a row's verifier comes from `verifiers`
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
}

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

# The verifier keys of RL (dispatch.py), for the other kinds that score with verifiers.
VERIFIER_KEYS = ("verifier", "verifiers", "extra_verifiers", "reward_weights", "verifier_timeout")

# Names of the merge methods (posttrain_cli.merge.methods), for torch-free checks (a test keeps them equal).
MERGE_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")

KINDS: dict[str, dict[str, Any]] = {
    "sft": {
        **COMMON,
        **TRAINING,
        # Pack several sequences per row with attention kept inside each sequence.
        "packing": ("bool", True),
        # Over max_seq_len: truncate (keep the start) or drop the row.
        "truncation": (("truncate", "drop"), "truncate"),
    },
    "reward_model": {
        **COMMON,
        **TRAINING,
        **PREFERENCE,
        # Llama 2's margin term: subtract each row's `margin` inside the sigmoid.
        "margin": ("bool", False),
        # A row ranking K answers gives K(K-1)/2 pairs: `row` weighs each row once
        # (InstructGPT's 1/C(K,2)), `pair` weighs every pair once.
        "ranked_weighting": (("row", "pair"), "row"),
    },
    "dpo": {
        **COMMON,
        **TRAINING,
        **PREFERENCE,
        "loss": (DPO_LOSSES, "dpo"),
        "beta": ("float", 0.1),
        # Conservative DPO: probability that a preference label is flipped.
        "label_smoothing": ("float", 0.0),
        # Adds nll_weight x (mean token NLL of the chosen answer); Llama 3 uses 0.2.
        "nll_weight": ("float", 0.0),
        # SimPO's target margin gamma (loss: simpo).
        "simpo_gamma": ("float", 0.5),
        # The reference model: a stage or a path; null is the stage's input model.
        "ref_from": ("?str", None),
        # Reference log-probs computed once before training (one model in memory);
        # false keeps a live reference model next to the policy.
        "precompute_ref": ("bool", True),
    },
    "grpo": {
        **COMMON,
        **{k: v for k, v in TRAINING.items() if k not in ("global_batch_size", "epochs")},
        **RL,
        # Passes over the prompts when max_steps is unset.
        "epochs": ("?float", 1.0),
        "lr": ("float", 1.0e-6),
        "schedule": (("constant", "linear", "cosine"), "constant"),
        "warmup_ratio": ("float", 0.0),
        # Advantage within each prompt's group: group_std (GRPO), centered (Dr.GRPO, OLMo 3), none.
        "adv_norm": (ADV_NORMS, "group_std"),
        # seq_mean_token_mean (GRPO), token_mean (DAPO), constant (Dr.GRPO: / max_new_tokens).
        "loss_agg": (LOSS_AGGS, "seq_mean_token_mean"),
        # The ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher: 0.28).
        "clip_low": ("float", 0.2),
        "clip_high": ("float", 0.2),
        # DAPO dynamic sampling: drop groups whose rewards are all equal and sample more
        # prompts, up to dynamic_sampling_rounds extra rounds per step.
        "dynamic_sampling": ("bool", False),
        "dynamic_sampling_rounds": ("int", 3),
        # DAPO overlong shaping: a linear penalty up to overlong_penalty over the last
        # overlong_buffer tokens before max_new_tokens; null: off.
        "overlong_buffer": ("?int", None),
        "overlong_penalty": ("float", 1.0),
        # R1-Zero: the reference becomes the current policy every N steps; null: never.
        "ref_refresh_every": ("?int", None),
    },
    "ppo": {
        **COMMON,
        **{k: v for k, v in TRAINING.items() if k not in ("global_batch_size", "epochs")},
        **RL,
        "epochs": ("?float", 1.0),
        "num_generations": ("int", 1),
        "lr": ("float", 1.0e-6),
        "schedule": (("constant", "linear", "cosine"), "constant"),
        "warmup_ratio": ("float", 0.0),
        # Per-token KL penalty in the reward: beta x KL estimate (Tulu 3: 0.05, k1).
        "beta": ("float", 0.05),
        "kl_estimator": (KL_ESTIMATORS, "k1"),
        # A reward_model stage (or path) scoring completions, times rm_weight.
        "reward_model": ("?str", None),
        "rm_weight": ("float", 1.0),
        # Verifier scores times this (Tulu 3: 10, with rm_weight 0).
        "verifiable_reward": ("float", 1.0),
        # The value model: a reward_model stage or a path; null: `reward_model`, else the input
        # policy with a new scalar head.
        "value_from": ("?str", None),
        "value_lr": ("?float", None),
        "vf_coef": ("float", 0.1),
        "gamma": ("float", 1.0),
        "lam": ("float", 0.95),
        "cliprange": ("float", 0.2),
        # Value predictions are clipped to old +- this; null: no clipping.
        "cliprange_value": ("?float", 0.2),
        # Passes over each rollout batch (each pass takes mini_batches updates).
        "ppo_epochs": ("int", 4),
        "whiten_advantages": ("bool", True),
        "whiten_rewards": ("bool", False),
    },
    "generate": {
        **COMMON,
        **GENERATION,
        # Completions per prompt; each becomes one row.
        "num_generations": ("int", 1),
    },
    "rejection_sampling": {
        **COMMON,
        **GENERATION,
        # K: completions sampled per prompt.
        "num_samples": ("int", 8),
        # best: the highest-scoring of the K (Llama 2 / 3); all_pass: every one that passes (R1).
        "keep": (("best", "all_pass"), "best"),
        # Minimum score to keep. all_pass with verifiers alone and no threshold: every
        # verifier of the row gives full marks (score >= 1).
        "threshold": ("?float", None),
        # all_pass: at most this many kept completions per prompt (distinct ones first); null: all.
        "max_per_prompt": ("?int", None),
        # Score = rm_weight x reward model (a reward_model stage or path) + verifiable_reward x verifiers.
        "reward_model": ("?str", None),
        "rm_weight": ("float", 1.0),
        "verifiable_reward": ("float", 1.0),
        **{k: RL[k] for k in VERIFIER_KEYS},
    },
    "merge": {
        **COMMON,
        # posttrain_cli/merge/methods.py: linear, slerp, task_arithmetic, ties, dare_linear, dare_ties.
        "method": (MERGE_METHODS, "linear"),
        # Models to merge: stages or paths (slerp: exactly 2).
        "models": ("list", REQUIRED),
        # One weight per model (default equal: 1/N for linear, 1 for the task-vector methods).
        "weights": ("?list", None),
        # The common ancestor for task_arithmetic, ties and dare_*: its weights are subtracted
        # from each model's to get task vectors, and added back after merging them.
        "base": ("?str", None),
        # ties / dare: the fraction of each task vector kept (one number or one per model).
        "density": ("any", 0.5),
        # slerp: 0 is the first model, 1 the second.
        "t": ("float", 0.5),
        # ties / dare_ties: divide by the summed weights of the models agreeing in sign.
        "normalize": ("bool", True),
        # Output dtype; auto: the first model's.
        "dtype": (("auto", "float32", "bfloat16", "float16"), "auto"),
        # Output shard size in bytes (HF's "5GB" style strings accepted too).
        "max_shard_size": ("str", "2GB"),
    },
    "distill": {
        **COMMON,
        **{k: v for k, v in TRAINING.items() if k not in ("global_batch_size", "epochs")},
        **{k: v for k, v in RL.items() if k not in ("beta", "kl_estimator", "ref_from", "no_eos_penalty")},
        "epochs": ("?float", 1.0),
        "lr": ("float", 1.0e-6),
        "schedule": (("constant", "linear", "cosine"), "constant"),
        "warmup_ratio": ("float", 0.0),
        "num_generations": ("int", 4),
        # Teachers by the value of a prompt row's `dataset` (or `domain`) field: stages or paths.
        "teachers": ("dict", REQUIRED),
        # route: each prompt's tokens are scored by its own teacher; mixture: by the teachers'
        # weighted mixture p = sum_k w_k p_k (weights from teacher_weights, default equal).
        "combine": (("route", "mixture"), "route"),
        "teacher_weights": ("dict", {}),
        # token: the per-token advantage sg[log p_teacher(y_t) - log p_student(y_t)] on the sampled
        # token (MiMo-V2-Flash); full: the full-vocabulary reverse KL at every position (DeepSeek V4).
        "kl": (("token", "full"), "token"),
        # The token advantage is clipped to [-adv_clip, adv_clip].
        "adv_clip": ("float", 2.0),
        # Importance weights pi/pi_sampler are truncated at this value; null: no truncation.
        "is_cap": ("?float", 2.0),
        # Outcome advantage weight: alpha x the group-centred verifier reward joins every token's
        # advantage (MiMo-V2-Flash); 0: pure distillation, no verifier needed.
        "alpha": ("float", 0.0),
        # Held-out prompts: reverse KL to the teachers on the student's own samples, measured
        # before training, every eval_every steps and after.
        "heldout": ("list", []),
        "eval_every": ("?int", None),
    },
    "eval": {
        **COMMON,
        **{k: v for k, v in EVAL.items() if k not in ("before",)},
    },
}

# A block of stages repeated `count` times (Llama 3's rounds): stages.<block> = {kind: rounds, ...}.
ROUNDS = {
    "kind": ("str", REQUIRED),
    "count": ("int", REQUIRED),
    "stages": ("dict", REQUIRED),
    # Round r's stages are named <prefix><r>.<name>: r1.rm, r1.dpo, r2.rm, ...
    "prefix": ("str", "r"),
    # What `prev.<name>` means in round 1 (a stage or a path); unset: the reference is dropped
    # (a `from` falls back to its default, a data source is left out).
    "initial": ("dict", {}),
}

# Kinds whose output is a policy (a causal LM) that a later stage's `from` may name,
# and kinds whose output is a scorer (a sequence-classification model).
POLICY_PRODUCING = {"sft", "dpo", "grpo", "ppo", "merge", "distill"}
SCORER_PRODUCING = {"reward_model"}
MODEL_PRODUCING = POLICY_PRODUCING | SCORER_PRODUCING
DATASET_PRODUCING = {"generate", "rejection_sampling"}
TRAINING_KINDS = {"sft", "reward_model", "dpo", "grpo", "ppo", "distill"}
# Training kinds that sample their own data: their batch is counted in rollouts.
RL_KINDS = {"grpo", "ppo", "distill"}
# Kinds without a `from`: their models come from their own keys (merge: models, base).
NO_FROM = {"merge"}

# The kinds of stage a `from` may name (default: a policy); a reward model may
# start from a policy or continue an earlier reward model.
FROM_KINDS = {"reward_model": MODEL_PRODUCING}

# Keys (besides `from`) that name another model, a stage or a path, and the
# kinds of stage each may name. `eval.` keys live in the stage's eval block.
MODEL_REFS = {
    "dpo": {"ref_from": POLICY_PRODUCING},
    "grpo": {"ref_from": POLICY_PRODUCING},
    "ppo": {"ref_from": POLICY_PRODUCING, "reward_model": SCORER_PRODUCING, "value_from": MODEL_PRODUCING},
    "rejection_sampling": {"reward_model": SCORER_PRODUCING},
    # A list (models) or a mapping (teachers) names several; each entry is checked.
    "merge": {"models": POLICY_PRODUCING, "base": POLICY_PRODUCING},
    "distill": {"teachers": POLICY_PRODUCING},
    "eval": {"reward_model": SCORER_PRODUCING},
}
EVAL_MODEL_REFS = {"reward_model": SCORER_PRODUCING}

# The row schema (posttrain_cli.data.schemas.ROW_SCHEMAS) of each kind's `data`.
DATA_ROWS = {"sft": "sft", "eval": "prompt", "reward_model": "preference", "dpo": "preference",
             "grpo": "prompt", "ppo": "prompt", "distill": "open_prompt", "rejection_sampling": "open_prompt",
             "generate": "open_prompt", "merge": None}
# The row schema of each dataset-producing kind's output (RUN_DIR/<stage>/data.jsonl).
OUTPUT_ROWS = {"generate": "sft", "rejection_sampling": "sft"}

# Where each kind's `run(ctx)` lives; imported only inside the stage worker.
KIND_MODULES = {
    "sft": "posttrain_cli.stages.sft",
    "reward_model": "posttrain_cli.stages.reward_model",
    "dpo": "posttrain_cli.stages.dpo",
    "grpo": "posttrain_cli.stages.grpo",
    "ppo": "posttrain_cli.stages.ppo",
    "eval": "posttrain_cli.stages.eval",
    "generate": "posttrain_cli.stages.generate",
    "rejection_sampling": "posttrain_cli.stages.rejection_sampling",
    "merge": "posttrain_cli.stages.merge",
    "distill": "posttrain_cli.stages.distill",
}
