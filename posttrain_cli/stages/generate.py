"""Sample completions from a model into an SFT dataset: offline distillation, synthetic data.

    stages:
      gen:
        kind: generate
        from: teacher               # default: the previous policy stage
        data: [{path: prompts.jsonl}]   # messages (or prompt); ground_truth, dataset, ... carried over
        num_generations: 4
        temperature: 0.8
      student:
        kind: sft
        from: base
        data: [{from: gen}]         # trains on RUN_DIR/gen/data.jsonl

Each prompt gets `num_generations` completions, each one row:
{"messages": prompt turns + the completion, the prompt row's fields, "prompt_index",
"sample_index", "finish_reason"}, in prompt order whatever the rank count. With
`drop_truncated` (default) a completion cut at max_new_tokens without EOS is left out
(counted): a student should not learn to stop mid-sentence. A run that keeps nothing
fails rather than publishing an empty dataset. Metrics: prompts, rows, truncated_dropped,
eos_rate, mean_length (tokens), seconds.
"""

from __future__ import annotations

import time

from posttrain_cli.engine import dist
from posttrain_cli.engine.inference import load_tokenizer
from posttrain_cli.errors import UserError
from posttrain_cli.rollout import sampling


def run(ctx) -> dict:
    cfg = ctx.cfg
    start = time.perf_counter()
    tokenizer = load_tokenizer(ctx.input_model, ctx.run["model"])
    prompts = sampling.load(ctx, tokenizer)
    sampler = sampling.input_sampler(ctx, tokenizer)
    samples = sampling.sample(ctx, sampler, prompts, cfg["num_generations"])
    del sampler
    kept = [s for s in samples if not (cfg["drop_truncated"] and s.truncated)]
    n, eos, tokens, rows = dist.all_sum(sampling.generation_sums(samples) + [len(kept)])
    if not rows:
        raise UserError(f"{ctx.where()}: all {int(n)} completions hit max_new_tokens={cfg['max_new_tokens']} "
                        f"without EOS and drop_truncated is on; raise {ctx.where('max_new_tokens')} or set "
                        f"{ctx.where('drop_truncated')}=false")
    sampling.write_rows(ctx, [sampling.output_row(prompts.rows[s.prompt], s, prompts.index[s.prompt]) for s in kept])
    metrics = {"prompts": len(prompts.rows), "prompts_too_long": prompts.too_long, "rows": int(rows),
               "truncated_dropped": int(n - rows), "eos_rate": eos / n, "mean_length": tokens / n,
               "seconds": time.perf_counter() - start}
    ctx.info(f"{metrics['rows']} rows from {metrics['prompts']} prompts x {cfg['num_generations']}"
             + (f" ({metrics['truncated_dropped']} cut at max_new_tokens dropped)" if metrics["truncated_dropped"]
                else "") + f"; EOS rate {metrics['eos_rate']:.1%}, mean length {metrics['mean_length']:.1f} tokens")
    return {"metrics": metrics, "outputs": {"data": "data.jsonl"}}
