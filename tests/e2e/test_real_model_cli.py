"""A user's own model and data through the CLI: a local Qwen3-architecture model with a real
vocabulary and Qwen3's own chat template (read from the installed trl package), Tulu-shaped rows
(`id`, `messages`, `source`), sft -> dpo -> grpo; a base model without a template; a preset run
with a shipped template (`recipe=tulu3 scale=tiny model.chat_template=tulu`)."""

from __future__ import annotations

import json

import pytest

from posttrain_cli.config.compose import compose
from tests.conftest import posttrain, stage_manifest, write_recipe
from tests.fixtures.real import build_model, trl_template


@pytest.mark.parametrize("model,path,zero,template", [
    ("qwen3_0_6b", "Qwen/Qwen3-0.6B-Base", 2, None), ("qwen3_1_7b", "Qwen/Qwen3-1.7B-Base", 2, None),
    ("llama3_2_1b", "meta-llama/Llama-3.2-1B", 2, "llama3"), ("smollm2_360m", "HuggingFaceTB/SmolLM2-360M", 2, "chatml"),
    ("olmo2_1b", "allenai/OLMo-2-0425-1B", 2, "tulu"), ("llama3_1_8b", "meta-llama/Llama-3.1-8B", 3, "llama3"),
    ("olmo3_7b", "allenai/Olmo-3-1025-7B", 3, "olmo3"),
])
def test_model_groups_bring_their_template(model, path, zero, template):
    cfg, _ = compose(["recipe=tiny", f"model={model}"])
    assert (cfg["model"]["path"], cfg["deepspeed"]["zero_stage"], cfg["model"].get("chat_template")) == \
        (path, zero, template)
    # The Tulu 3 and OLMo 3 Think presets set their own on top of the model's.
    assert compose(["recipe=tulu3", f"model={model}"])[0]["model"]["chat_template"] == "tulu"
    assert compose(["recipe=olmo3_think", f"model={model}"])[0]["model"]["chat_template"] == "olmo3"


def _rows(tmp_path):
    sft = [{"id": f"t-{i}", "source": "tiny_arith",
            "messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                         {"role": "assistant", "content": f"<think>\n{i} plus {i + 1}.\n</think>\n\n{2 * i + 1}"},
                         {"role": "user", "content": "And doubled?"},
                         {"role": "assistant", "content": f"{4 * i + 2}"}]} for i in range(24)]
    pref = [{"id": f"p-{i}", "source": "tiny_pref", "chosen_rating": 5,
             "chosen": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}],
             "rejected": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 3}"}]}
            for i in range(16)]
    rl = [{"messages": [{"role": "user", "content": f"What is {i} + 2?"}], "ground_truth": str(i + 2),
           "dataset": "tiny_arith", "constraint_type": None} for i in range(16)]
    for name, rows in (("sft", sft), ("pref", pref), ("rl", rl)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_a_users_qwen3_recipe_runs_sft_dpo_grpo(tmp_path):
    model = build_model("qwen3", tmp_path / "my-qwen3", "qwen2", trl_template("qwen3"), instruct=False)
    _rows(tmp_path)
    write_recipe(tmp_path, f"""
        defaults: [base, _self_]
        name: mine
        run_dir: {tmp_path}/run
        model: {{path: {model}}}
        stages:
          sft: {{kind: sft, data: [{{path: {tmp_path}/sft.jsonl}}], lr: 1.0e-3, max_steps: 3,
                 global_batch_size: 8, micro_batch_size: 8, max_seq_len: 128}}
          dpo: {{kind: dpo, data: [{{path: {tmp_path}/pref.jsonl}}], lr: 1.0e-4, max_steps: 2,
                 global_batch_size: 8, micro_batch_size: 8, max_seq_len: 64}}
          grpo: {{kind: grpo, data: [{{path: {tmp_path}/rl.jsonl}}], verifier: number, max_steps: 2,
                  prompts_per_step: 4, num_generations: 2, max_new_tokens: 6}}
    """, name="mine")
    r = posttrain("run", "recipe=mine.yaml", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "run"
    log = (run / "sft" / "logs" / "rank0.log").read_text()
    # Qwen3's template drops earlier reasoning: each of the 2 answers is its own example.
    assert "24 conversations -> 48 examples" in log, log
    from transformers import AutoModelForCausalLM, AutoTokenizer

    im_end = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids("<|im_end|>")
    for stage in ("sft", "dpo", "grpo"):
        assert stage_manifest(run, stage)["status"] == "completed"
        out = run / stage / "model"
        m = AutoModelForCausalLM.from_pretrained(out)
        eos = m.generation_config.eos_token_id
        assert im_end in (eos if isinstance(eos, list) else [eos]), (stage, eos)
        assert "<think>" in AutoTokenizer.from_pretrained(out).chat_template


def test_a_base_model_without_a_template_stops_naming_the_key(tmp_path):
    model = build_model("llama", tmp_path / "base", "llama3", None, instruct=False)
    _rows(tmp_path)
    write_recipe(tmp_path, f"""
        defaults: [base, _self_]
        name: mine
        run_dir: {tmp_path}/run
        model: {{path: {model}}}
        stages:
          sft: {{kind: sft, data: [{{path: {tmp_path}/sft.jsonl}}], max_steps: 1}}
    """, name="mine")
    for cmd in ("plan", "run"):
        r = posttrain(cmd, "recipe=mine.yaml", cwd=tmp_path)
        assert r.returncode == 2, r.stdout + r.stderr
        lines = (r.stdout + r.stderr).strip().splitlines()
        assert len(lines) == 1 and "model.chat_template" in lines[0] and "has no chat template" in lines[0], lines
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "sft").exists()
    r = posttrain("plan", "recipe=mine.yaml", "model.chat_template=llama3", cwd=tmp_path)
    # (rich wraps the plan's header at the terminal's width, which depends on this test's path)
    assert r.returncode == 0 and "chat template llama3" in " ".join(r.stdout.split()), r.stdout + r.stderr


@pytest.mark.slow
def test_tulu3_at_tiny_scale_with_the_tulu_template(tmp_path):
    r = posttrain("run", "recipe=tulu3", "scale=tiny", "model.chat_template=tulu", f"run_dir={tmp_path}/run",
                  cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    saved = (tmp_path / "run" / "sft" / "model")
    template = (saved / "chat_template.jinja").read_text()
    assert "<|assistant|>" in template and "open-instruct" in template
