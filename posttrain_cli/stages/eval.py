"""Held-out accuracy: generate for prompts, score with a verifier.

    posttrain run recipe=tiny            # every stage's `eval:` block
    stages: {final: {kind: eval, from: sft, data: [...], verifier: number}}

Used two ways: as a stage's `eval` block (run on the stage's input model when
`before: true`, and on its output) and as a stage kind of its own. Prompts are
split over ranks; under ZeRO-3 the model stays sharded and ranks generate in
lock-step. Greedy by default, so accuracy is reproducible.
"""

from __future__ import annotations

import time
from pathlib import Path

from posttrain_cli.data.chat import prompt_ids
from posttrain_cli.data.schemas import prompt_row
from posttrain_cli.data.sources import load_mixture
from posttrain_cli.engine import dist
from posttrain_cli.engine.inference import load_tokenizer
from posttrain_cli.errors import UserError
from posttrain_cli.rewards import VERIFIERS
from posttrain_cli.rollout.backend import frozen_sampler, shard


def evaluate(ctx, model_path: str, ecfg: dict, where: str, reward_model: str | None = None) -> dict:
    """Accuracy of model_path's generations; with reward_model (a path), also their mean reward."""
    verify = VERIFIERS[ecfg["verifier"]]
    model_cfg, ds = ctx.run["model"], ctx.run["deepspeed"]
    tokenizer = load_tokenizer(model_path, model_cfg)
    rows = load_mixture(ecfg["data"], f"{where}.data", prompt_row, ctx.seed, resolved_from=ctx.datasets)
    if ecfg["limit"]:
        rows = rows[: ecfg["limit"]]
    start = time.perf_counter()
    mine, calls = shard(list(range(len(rows))), ecfg["batch_size"])
    prompts = [prompt_ids(tokenizer, rows[i]["messages"]) for i in mine]
    sampler = frozen_sampler(ctx, model_path, tokenizer)
    limit = getattr(sampler, "max_model_len", None)
    for i, p in zip(mine, prompts):
        if limit is not None and len(p) + ecfg["max_new_tokens"] > limit:
            raise UserError(f"{where}.data: prompt {i} is {len(p)} tokens; with max_new_tokens "
                            f"{ecfg['max_new_tokens']} it passes the vLLM engine's {limit} (rollout.backend=hf "
                            f"samples it)")
    # A batch at a time, as rollout/sampling.py does, for the progress bar (every rank the same calls).
    bs, outs = ecfg["batch_size"], []
    bar = ctx.progress(calls, f"eval {Path(model_path).name}")
    for c in range(calls):
        outs += sampler.generate(prompts[c * bs:(c + 1) * bs], max_new_tokens=ecfg["max_new_tokens"],
                                 temperature=ecfg["temperature"], top_p=ecfg["top_p"], batch_size=bs, calls=1)
        bar.update(c + 1, {"completions": len(outs)})
    bar.close()
    correct = sum(verify(o.text, rows[i]["ground_truth"], rows[i]) for i, o in zip(mine, outs))
    eos = sum(o.finish_reason == "eos" for o in outs)
    length = sum(len(o.token_ids) for o in outs)
    correct, eos, length, n = dist.all_sum([correct, eos, length, len(outs)])
    if dist.is_main() and outs:
        ctx.log.info("sample: %r -> %r (truth %r)", rows[mine[0]]["messages"][-1]["content"], outs[0].text,
                     rows[mine[0]]["ground_truth"])
    del sampler
    result = {"accuracy": correct / n, "n": int(n), "eos_rate": eos / n, "mean_length": length / n,
              "verifier": ecfg["verifier"]}
    if reward_model:
        from posttrain_cli.rewards.rm import RewardScorer

        scorer = RewardScorer(reward_model, model_cfg, ds, batch_size=ecfg["batch_size"])
        rewards = scorer.score([rows[i]["messages"] for i in mine], [o.text for o in outs], calls=calls)
        total, count = dist.all_sum([sum(rewards), len(rewards)])
        result["reward"] = total / count
        del scorer
    result["seconds"] = time.perf_counter() - start
    return result


def run(ctx) -> dict:
    """The stage kind `eval`: score the input model; produces no artifact."""
    result = evaluate(ctx, ctx.input_model, ctx.cfg, ctx.where(), ctx.models.get("reward_model"))
    ctx.info(f"accuracy {result['accuracy']:.1%} on {result['n']} prompts ({result['verifier']})"
             + (f", mean reward {result['reward']:.3g}" if "reward" in result else ""))
    return {"metrics": {"eval": {"after": result}}, "outputs": {}}
