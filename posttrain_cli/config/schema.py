"""The keys a recipe may set outside its stages, their types and defaults; each stage kind's keys
are its record's (posttrain_cli/kinds/).

Plain tables, not dataclasses: a stage key is called `from`, and a table gives
the error messages we want ("unknown key stages.sft.lrr; did you mean lr?").
Nothing here imports torch.
"""

from __future__ import annotations

from posttrain_cli.kinds.base import REQUIRED

# A key spec is (type, default). Types: "str", "int", "float", "bool", "list",
# "dict", "any"; "?x" allows null; a tuple of strings is a choice (kinds/base.py).

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
    "rollout": ("section", None),
    "lora": ("section", None),
    "stages": ("stages", None),
}

# logging.report_to's trackers (pipeline/trackers.py): name -> (the module it needs, the extra that
# installs it).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
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
        # The chat template every stage renders with and saves with its model: null (the model's
        # own), a shipped name (tulu, chatml, llama3, olmo3; posttrain_cli/data/templates/), a .jinja
        # file, or the template itself. A base model without a template needs one.
        "chat_template": ("?str", None),
        # Architecture of the tiny model (only with path: tiny).
        "tiny": ("?dict", None),
    },
    "deepspeed": {
        "zero_stage": ((0, 1, 2, 3), 2),
        "offload_optimizer": ("bool", False),
        "offload_param": ("bool", False),
        # Keep only each decoder layer's input for the backward pass and recompute the rest (memory for
        # about a third more compute): the training stages' models. Not in the fingerprint.
        "activation_checkpointing": ("bool", False),
        # torch.compile each decoder layer of the training stages' models (regional compile, dynamic
        # sequence length: packed rows of any length reuse one graph; engine/regional_compile.py): the
        # first step compiles (25-35 s on CPU), the rest ran 1.1-1.2x faster on CPU (README). Needs a
        # C++ compiler on CPU. Not with zero_stage 3. Not in the fingerprint.
        "compile": ("bool", False),
        # The kernels behind the LM head's log-probs (every loss reads only log p(target) per token):
        # torch: plain-torch chunks (losses/linear.py, the reference); liger: liger-kernel's Triton
        # cross-entropy over the same chunks (`pip install 'posttrain[liger]'`, CUDA; passes that also
        # want the entropy, grpo's and ppo's policy pass, stay on torch). Not in the fingerprint.
        "kernels": (("torch", "liger"), "torch"),
        # auto: bf16 on GPUs, fp32 on CPU. bf16 on GPUs: DeepSpeed's (bf16 weights, fp32 masters); bf16
        # without CUDA: fp32 weights and optimizer, every forward under torch.autocast(bfloat16), the
        # speed of the CPU's bf16 matmuls (AVX512-BF16, AMX) with a curve close to fp32's.
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
        # and exits 75; the job script requeues the job (0: no warning signal).
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
        # Experiment trackers that also get every metrics row: any of tensorboard, wandb, mlflow,
        # trackio (each its library, an extra: pip install 'posttrain[wandb]'); pipeline/trackers.py.
        "report_to": ("list", []),
    },
    # What samples for grpo, ppo, distill, generate, rejection_sampling and eval blocks
    # (posttrain_cli/rollout/); a stage's own `rollout` block overrides any key for that stage.
    # Not in the fingerprint: it decides how the samples are drawn, not what the stage is.
    "rollout": {
        # hf: Hugging Face generate on the trainer's own module; vllm: a vLLM engine in each rank's
        # process (pip install 'posttrain[vllm]'), loaded with the policy's weights after every
        # update; auto: vllm where it is installed and runs the model, else hf.
        "backend": (("auto", "hf", "vllm"), "auto"),
        # GPUs: the share of each GPU's memory the engine takes (weights and KV cache), next to the
        # trainer's.
        "gpu_memory_utilization": ("float", 0.3),
        # GPUs: ranks that hold one engine together (tensor parallel); divides the rank count.
        "tensor_parallel_size": ("int", 1),
        # GPUs: the engine frees its memory while the trainer updates (vLLM sleep mode).
        "sleep": ("bool", True),
        # CPU: the engine's KV cache, GiB.
        "kv_cache_gb": ("float", 1.0),
        # No CUDA graphs or torch.compile: a start in seconds, slower decoding.
        "enforce_eager": ("bool", False),
    },
    # LoRA adapters (peft) on the training stages: the run's default, a stage's own `lora` block over
    # it (stages.sft.lora={r: 8}). Off while r is null. A LoRA stage publishes its adapter merged into
    # the input model (a plain Hugging Face model) and the adapter itself beside it (engine/lora.py).
    "lora": {
        # The adapter's rank; null: no adapter, the whole model trains.
        "r": ("?int", None),
        # The update is scaled by alpha / r (alpha / sqrt(r) with use_rslora); null: 2 x r.
        "alpha": ("?float", None),
        "dropout": ("float", 0.0),
        # all-linear: every linear layer of the decoder (not the output head); or a list of module
        # names (q_proj, v_proj, ...).
        "target_modules": ("any", "all-linear"),
        # Modules trained in full next to the adapter (a reward model's score head always is).
        "modules_to_save": ("?list", None),
        "use_rslora": ("bool", False),
        # The adapter's start: default (B = 0, the input model exactly), gaussian, pissa, olora.
        "init": (("default", "gaussian", "pissa", "olora"), "default"),
        # 4bit: QLoRA, the frozen base in 4-bit NF4 (bitsandbytes, CUDA GPUs only).
        "quantize": ("?str", None),
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


def stage_deepspeed(run: dict, stage_cfg: dict) -> dict:
    """A stage's deepspeed settings: the run's section, the stage's own block over it."""
    return {**run["deepspeed"], **{k: v for k, v in (stage_cfg.get("deepspeed") or {}).items() if v is not None}}


def stage_lora(run: dict, stage_cfg: dict) -> dict | None:
    """A training stage's LoRA settings (the run's lora section, the stage's block over it), or None
    when it trains the whole model (r null)."""
    if "lora" not in stage_cfg:
        return None
    lora = {**run["lora"], **{k: v for k, v in (stage_cfg.get("lora") or {}).items() if v is not None}}
    return lora if lora["r"] is not None else None
