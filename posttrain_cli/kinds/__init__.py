"""Every stage kind's record (kinds/base.py: Kind), by name, in the order `posttrain` lists them.

    from posttrain_cli.kinds import KINDS
    KINDS["dpo"].schema["beta"]                      # ("float", 0.1)
    KINDS["grpo"].batch("stages.grpo", stage, 2)     # the batch arithmetic
    KINDS["sft"].module                              # where its run(ctx) lives

A new kind is one file here (its record) and its run module in stages/. Torch-free.
"""

from __future__ import annotations

from posttrain_cli.kinds import (distill, dpo, eval, generate, grpo, merge, ppo, rejection_sampling, reward_model,
                                 sft)
from posttrain_cli.kinds.base import Kind

KINDS: dict[str, Kind] = {k.name: k for k in (
    sft.KIND, reward_model.KIND, dpo.KIND, grpo.KIND, ppo.KIND, generate.KIND, rejection_sampling.KIND,
    merge.KIND, distill.KIND, eval.KIND,
)}
