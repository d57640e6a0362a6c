"""Every stage kind on tiny random models of real architectures with real vocabularies and the chat
templates real checkpoints ship (tests/fixtures/real.py), through the CLI, on 2 ranks under ZeRO-3:

- `qwen3`: a Qwen3 model (untied head) with Qwen2's 151k byte-level BPE, its embedding padded to
  151936 rows as Qwen3 checkpoints pad theirs, and trl's qwen3.jinja as the model's own template (the template rewrites history: reasoning of earlier turns is dropped, the
  last turn gets a think block), its generation_config a base model's (eos <|endoftext|> only);
- `llama`: a Llama model with Llama 3's 128k vocabulary, no template of its own (a base model), given
  trl's llama3_1.jinja through `model.chat_template` (a .jinja file); eos <|end_of_text|> only.

The Qwen3 recipe chains sft -> reward_model, dpo, grpo, ppo, generate, rejection_sampling,
merge, distill, eval on 2 ranks (Llama's chain through the CLI: tests/e2e/test_real_model_cli.py);
another recipe per model, on 1 rank, is an SFT from the base model on one short
answer repeated (`sft_eot`) until it ends its turn, and greedy generation from it (`gen_eot`). Random
weights rarely stop by themselves, so the stopping checks are: every published model's
generation_config lists the template's end-of-turn token, and the model taught to answer ends its
answer with that token and stops there. The Qwen 1-rank recipe also merges two tied Qwen2 models
(the merged head stays tied; a merge runs on rank 0 alone whatever the ranks) and distills from a
teacher whose embedding is padded to another size. The two models' recipes of a setup run side by side.

    python -m pytest -n 0 tests/integration/test_real_models.py            # all: ~6 min on 2 busy cores
    python -m pytest -n 0 tests/integration/test_real_models.py -m "not dist"   # the 1-rank recipes only

Data is Tulu-shaped: SFT rows {id, messages, source} (a few with a system turn, a few two-turn),
preference rows {id, source, chosen, rejected}, prompt rows {messages, ground_truth, dataset: gsm8k}
(gsm8k routes to the `number` verifier).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import NamedTuple

import pytest

from tests.conftest import posttrain, stage_manifest, tiny_rows, write_jsonl, write_recipe
from tests.fixtures.real import FAMILIES, build_model, tokenizer, trl_template

pytestmark = [pytest.mark.slow, pytest.mark.heavy]



class Model(NamedTuple):
    arch: str
    family: str
    # trl's template: the model's own (own=True) or given by model.chat_template (a base model's case)
    template: str
    own: bool
    # embedding rows: Qwen3 checkpoints pad theirs to 151936 (len(tokenizer) is 151669); None: len(tokenizer)
    vocab_size: int | None


MODELS = {"qwen3": Model("qwen3", "qwen2", "qwen3", True, 151936), "llama": Model("llama", "llama3", "llama3_1", False, None)}
# The whole chain runs on 2 ranks with ZeRO-3, the path with most to get wrong (gathered saves, sharded
# generation, ...); 1 rank runs the end-of-turn stages and QWEN_EXTRA's (1 rank's chain is the tiny
# recipe's and tests/integration/test_rl_dist.py's, on the tiny Llama).
SETUPS = {"1rank": [], "2rank_zero3": ["cluster.nproc_per_node=2", "deepspeed=zero3"]}
CHAIN = "2rank_zero3"
# The chain runs on Qwen3 (embeddings padded past its tokenizer, a template of its own); Llama, with
# its template given by model.chat_template, runs the end-of-turn stages (and
# tests/e2e/test_real_model_cli.py's CLI runs).
CHAIN_MODELS = ["qwen3"]
KINDS = ["sft", "rm", "dpo", "grpo", "ppo", "gen", "rs", "soup", "distill", "evaluate"]
EOT = ["sft_eot", "gen_eot"]
# Stages that publish a causal LM (rm publishes a scalar-head model).
CAUSAL = ["sft", "dpo", "grpo", "ppo", "soup", "distill"]
ANSWER = "Hi!"

TRAIN = """
    max_seq_len: 160
    global_batch_size: 8
    micro_batch_size: 4"""
# One step and 4 new tokens: each kind's sampling, update and gathered save on the real vocabulary
# (under ZeRO-3 every new token gathers the whole model, ~0.4 s here); a second step's sampling from
# updated shards is the same code on any model (tests/integration/test_rl_dist.py, 2 ranks, ZeRO-3).
RL = """
    data: [{{path: {tmp}/prompts.jsonl}}]
    prompts_per_step: 4
    max_new_tokens: 4
    max_steps: 1
    max_seq_len: 160
    micro_batch_size: 2
    rollout_batch_size: 8"""
SAMPLE = """
    data: [{{path: {tmp}/prompts.jsonl}}]
    max_new_tokens: 4
    max_seq_len: 160
    limit: 8
    drop_truncated: false"""

STAGES = """
  sft:
    kind: sft
    data: [{{path: {tmp}/sft.jsonl}}]
    lr: 1.0e-3
    max_steps: 3""" + TRAIN + """
  rm:
    kind: reward_model
    from: sft
    data: [{{path: {tmp}/pref.jsonl}}]
    lr: 1.0e-3
    max_steps: 2""" + TRAIN + """
  dpo:
    kind: dpo
    from: sft
    data: [{{path: {tmp}/pref.jsonl}}]
    lr: 1.0e-3
    max_steps: 2""" + TRAIN + """
  grpo:
    kind: grpo
    from: sft
    num_generations: 2
    lr: 1.0e-3""" + RL + """
  ppo:
    kind: ppo
    from: sft
    reward_model: rm
    num_generations: 1
    ppo_epochs: 1
    lr: 1.0e-3""" + RL + """
  gen:
    kind: generate
    from: sft
    num_generations: 2""" + SAMPLE + """
  rs:
    kind: rejection_sampling
    from: sft
    num_samples: 2""" + SAMPLE + """
  soup:
    kind: merge
    models: [sft, dpo]
    weights: [0.5, 0.5]
  distill:
    kind: distill
    from: sft
    teachers: {{gsm8k: dpo}}
    num_generations: 2
    lr: 1.0e-3""" + RL + """
  evaluate:
    kind: eval
    from: soup
    data: [{{path: {tmp}/prompts.jsonl}}]
    max_new_tokens: 4
    limit: 8
"""

# 1 rank only: what the model learns does not depend on the ranks, and 20 more steps plus a
# sampling stage cost ~50 s under torchrun. One micro-batch of 8 a step: the loss curve of two of 4
# accumulated (measured: the same to the digit) for a fifth less CPU.
EOT_STAGES = """
  sft_eot:
    kind: sft
    from: {base}
    data: [{{path: {tmp}/hi.jsonl}}]
    lr: 1.0e-2
    max_steps: {eot_steps}
    warmup_ratio: 0.0
    schedule: constant
    max_seq_len: 160
    global_batch_size: 8
    micro_batch_size: 8
  gen_eot:
    kind: generate
    from: sft_eot
    data: [{{path: {tmp}/hi_prompts.jsonl}}]
    temperature: 0.0
    max_new_tokens: 24
    max_seq_len: 160
    drop_truncated: false
"""

# The Qwen 1-rank recipe's other stages, after the end-of-turn ones (a failed stage stops the
# stages after it): a merge of two tied Qwen2 models, and a distill whose teacher pads its
# embedding to 152064 rows (Qwen2.5-7B's) while the student pads to 151936.
QWEN_EXTRA = """
  tied_soup:
    kind: merge
    models: [{tied_a}, {tied_b}]
    weights: [0.5, 0.5]
  distill_padded:
    kind: distill
    teachers: {{gsm8k: {teacher}}}
    num_generations: 2
    lr: 1.0e-3""" + RL + "\n"
# Measured (1 rank): the loss of the repeated answer falls from ~12 to 0.2 (Qwen3) and 0.03 (Llama)
# in 20 steps; greedy decoding then writes the answer and the end of turn.
EOT_STEPS = 20


@dataclass
class Run:
    name: str
    model: str
    base: Path
    run_dir: Path
    result: CompletedProcess
    wall: float

    def failure(self, stage: str) -> str:
        """Why `stage` did not complete: its error record and log tail, or the CLI's output."""
        d = self.run_dir / stage
        parts = [f"{self.name}: stage {stage} did not complete (exit {self.result.returncode})"]
        for f in (d / "error.json", d / "logs" / "rank0.log"):
            if f.is_file():
                parts.append(f"--- {f.name}\n{f.read_text()[-3000:]}")
        parts.append(f"--- CLI stdout\n{self.result.stdout[-2500:]}\n--- CLI stderr\n{self.result.stderr[-2500:]}")
        return "\n".join(parts)

    def completed(self, stage: str) -> dict:
        path = self.run_dir / stage / "manifest.json"
        manifest = json.loads(path.read_text()) if path.is_file() else {}
        if manifest.get("status") != "completed":
            pytest.fail(self.failure(stage))
        return manifest


def _data(tmp: Path) -> None:
    """Tulu-shaped rows from the shipped arithmetic (tests/conftest.py's tiny_rows)."""
    sft, chats = [], [r["messages"] for r in tiny_rows("sft_train.jsonl", 49)]
    for i, messages in enumerate(chats[:48]):
        if i % 8 == 0:
            messages = [{"role": "system", "content": "You add numbers."}] + messages
        if i % 6 == 1:
            messages = messages + chats[i + 1]
        sft.append({"id": f"tiny_sft_{i}", "messages": messages, "source": "tiny_arithmetic"})
    write_jsonl(tmp / "sft.jsonl", sft)
    write_jsonl(tmp / "pref.jsonl", [{"id": f"tiny_pref_{i}", "source": "tiny_arithmetic", **r}
                                     for i, r in enumerate(tiny_rows("pref_train.jsonl", 32))])
    write_jsonl(tmp / "prompts.jsonl", [{"messages": r["messages"], "ground_truth": r["ground_truth"],
                                         "dataset": "gsm8k"} for r in tiny_rows("rl_train.jsonl", 32)])
    questions = ["Say hi.", "Greet me.", "Hello?", "Say hello to me."]
    write_jsonl(tmp / "hi.jsonl", [{"id": f"hi_{i}", "source": "hi", "messages": [
        {"role": "user", "content": questions[i % 4]}, {"role": "assistant", "content": ANSWER}]} for i in range(32)])
    write_jsonl(tmp / "hi_prompts.jsonl", [{"messages": [{"role": "user", "content": q}]} for q in questions])


def _recipe(tmp: Path, name: str, base: Path, template_file: Path | None, extra: dict | None, eot: bool) -> Path:
    """The chain (eot False) or the end-of-turn stages (eot True), then QWEN_EXTRA's stages with
    `extra` ({tied_a, tied_b, teacher}) if given."""
    model = f"model:\n  path: {base}\n"
    if template_file is not None:
        model += f"  chat_template: {template_file}\n"
    stages = EOT_STAGES.format(tmp=tmp, base=base, eot_steps=EOT_STEPS) if eot else STAGES.format(tmp=tmp)
    if extra:
        stages += QWEN_EXTRA.format(tmp=tmp, **extra)
    body = f"defaults: [base, _self_]\nname: {name}\nrun_dir: {tmp / 'runs' / name}\n{model}stages:{stages}"
    return write_recipe(tmp, body, name)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """The base models (built once): {name: (dir, template file or None)}, the tied Qwen2 pair and
    a Qwen3 teacher whose embedding is padded to 152064 rows."""
    tmp = tmp_path_factory.mktemp("real_bases")
    out = {}
    for name, (arch, family, template, own, vocab_size) in MODELS.items():
        text = trl_template(template)
        path = build_model(arch, tmp / name, family, text if own else None, seed=0, instruct=False,
                           vocab_size=vocab_size)
        template_file = None
        if not own:
            template_file = tmp / f"{template}.jinja"
            template_file.write_text(text)
        out[name] = (path, template_file)
    out["tied"] = tuple(build_model("qwen2", tmp / f"tied_{s}", "qwen2", trl_template("qwen2_5"), seed=s)
                        for s in (1, 2))
    out["padded_teacher"] = build_model("qwen3", tmp / "teacher", "qwen2", trl_template("qwen3"), seed=5,
                                        vocab_size=152064)
    return out


class Runs(dict):
    """(model, setup) -> Run. A setup's recipes (one per model) start together, the first time a
    test asks for one of them (so `-m "not dist"` runs no 2-rank recipe): two runs side by side on
    2 cores overlap their start-up and launches. A failed stage fails only the tests that read it."""

    def __init__(self, bases: dict, tmp_path_factory):
        super().__init__()
        self.bases, self.factory = bases, tmp_path_factory

    def _run(self, name: str, setup: str) -> Run:
        tmp = self.factory.mktemp(f"{name}_{setup}")
        _data(tmp)
        base, template_file = self.bases[name]
        extra = None
        if name == "qwen3" and setup == "1rank":
            (a, b), teacher = self.bases["tied"], self.bases["padded_teacher"]
            extra = {"tied_a": a, "tied_b": b, "teacher": teacher}
        rec = _recipe(tmp, name, base, template_file, extra, eot=setup == "1rank")
        t0 = time.time()
        r = posttrain("run", f"recipe={rec}", *SETUPS[setup], cwd=tmp, timeout=1200)
        print(f"[{name} {setup}] posttrain run: exit {r.returncode} in {time.time() - t0:.0f} s")
        return Run(f"{name} {setup}", name, base, tmp / "runs" / name, r, time.time() - t0)

    def __missing__(self, key):
        setup = key[1]
        names = list(MODELS) if setup != CHAIN else CHAIN_MODELS
        with ThreadPoolExecutor(len(names)) as pool:
            done = {name: pool.submit(self._run, name, setup) for name in names}
            for name, future in done.items():
                self[(name, setup)] = future.result()
        return self[key]


@pytest.fixture(scope="module")
def runs(bases, tmp_path_factory) -> Runs:
    return Runs(bases, tmp_path_factory)


CASES = [pytest.param(name, CHAIN, marks=[pytest.mark.dist], id=f"{name}-{CHAIN}") for name in CHAIN_MODELS]


def end_of_turn_id(name: str) -> int:
    family = MODELS[name].family
    return tokenizer(family).convert_tokens_to_ids(FAMILIES[family].end_of_turn)


@pytest.mark.parametrize("name, setup", CASES)
@pytest.mark.parametrize("stage", KINDS)
def test_stage_completes(runs, name, setup, stage):
    runs[(name, setup)].completed(stage)


@pytest.mark.parametrize("name, setup", CASES)
def test_published_models_load_and_stop_on_the_templates_end_of_turn(runs, name, setup):
    """Every causal LM a stage publishes loads with AutoModelForCausalLM and AutoTokenizer, carries
    the template, tokenizes like the real tokenizer, and its generation_config stops on the
    template's end of turn as well as on the base EOS (the base listed only the EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run = runs[(name, setup)]
    arch, family, template, _, vocab_size = MODELS[name]
    real = tokenizer(family)
    sample = "Hi there\n\n2023 650841823 don't"
    eot, eos = end_of_turn_id(name), real.eos_token_id
    assert GenerationConfig.from_pretrained(run.base).eos_token_id == eos
    for stage in CAUSAL:
        run.completed(stage)
        path = run.run_dir / stage / "model"
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == arch and model.config.vocab_size == (vocab_size or len(real)), stage
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.chat_template == trl_template(template), stage
        assert tok(sample)["input_ids"] == real(sample)["input_ids"], stage
        stops = GenerationConfig.from_pretrained(path).eos_token_id
        stops = stops if isinstance(stops, list) else [stops]
        assert eot in stops and eos in stops, f"{stage}: generation_config eos_token_id {stops}"


@pytest.mark.parametrize("name, setup", CASES)
def test_the_reward_model_publishes_a_scalar_head(runs, name, setup):
    from transformers import AutoModelForSequenceClassification

    run = runs[(name, setup)]
    run.completed("rm")
    model = AutoModelForSequenceClassification.from_pretrained(run.run_dir / "rm" / "model")
    assert model.config.num_labels == 1 and model.config.model_type == MODELS[name].arch


@pytest.mark.parametrize("name", list(MODELS))
def test_sft_on_one_answer_learns_to_end_its_turn(runs, name):
    """After sft_eot, greedy generation with the published generation_config writes the answer, then
    the template's end-of-turn token, and stops there, both through transformers and through the
    generate stage (every row ends by EOS, its text is the answer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs[(name, "1rank")]
    run.completed("sft_eot")
    path = run.run_dir / "sft_eot" / "model"
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                     tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    eot = end_of_turn_id(name)
    assert eot in out, f"no end of turn in {tok.decode(out)!r}"
    assert out.index(eot) == len(out) - 1, f"did not stop at the end of turn: {tok.decode(out)!r}"
    assert ANSWER in tok.decode(out, skip_special_tokens=True)

    run.completed("gen_eot")
    rows = [json.loads(l) for l in (run.run_dir / "gen_eot" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["finish_reason"] == "eos" for r in rows), [r["finish_reason"] for r in rows]
    assert all(ANSWER in r["messages"][-1]["content"] for r in rows), [r["messages"][-1] for r in rows]
    # The answer is stored without the end-of-turn marker (it is the template's to add).
    assert all(FAMILIES[MODELS[name].family].end_of_turn not in r["messages"][-1]["content"] for r in rows)


@pytest.mark.parametrize("name, setup", CASES)
def test_sampled_rows_are_sft_rows(runs, name, setup):
    run = runs[(name, setup)]
    prompts = [json.loads(l) for l in (run.run_dir.parent.parent / "prompts.jsonl").read_text().splitlines()]
    for stage in ("gen", "rs"):
        run.completed(stage)
        rows = [json.loads(l) for l in (run.run_dir / stage / "data.jsonl").read_text().splitlines()]
        assert rows, stage
        for r in rows:
            assert r["messages"][:-1] == prompts[r["prompt_index"]]["messages"], stage
            assert r["messages"][-1]["role"] == "assistant", stage
    assert len([json.loads(l) for l in (run.run_dir / "gen" / "data.jsonl").read_text().splitlines()]) == 16


@pytest.mark.parametrize("name, setup", CASES)
def test_eval_grades_the_merged_model(runs, name, setup):
    m = runs[(name, setup)].completed("evaluate")["metrics"]
    text = json.dumps(m)
    assert "accuracy" in text, text[:500]


def test_merge_of_tied_qwen2_models_keeps_the_head_tied(runs, bases):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run = runs[("qwen3", "1rank")]
    run.completed("tied_soup")
    path = run.run_dir / "tied_soup" / "model"
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    tensors = {}
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys()})
    embed = tensors["model.embed_tokens.weight"]
    assert "lm_head.weight" not in tensors or torch.equal(tensors["lm_head.weight"], embed)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    a, b = (AutoModelForCausalLM.from_pretrained(p).model.embed_tokens.weight for p in bases["tied"])
    torch.testing.assert_close(embed, (a + b) / 2)


@pytest.mark.parametrize("name, setup", CASES)
def test_published_tensors_are_the_base_models(runs, name, setup):
    """Every causal LM published (ZeRO-3 gathers its shards) has the base model's tensor names and
    shapes: q/k norms, the untied head, no tensor lost or renamed."""
    from safetensors import safe_open

    def shapes(path: Path) -> dict:
        out = {}
        for f in path.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
        return out

    run = runs[(name, setup)]
    base = shapes(run.base)
    assert "lm_head.weight" in base and (name != "qwen3" or any("q_norm" in k for k in base))
    for stage in CAUSAL:
        run.completed(stage)
        assert shapes(run.run_dir / stage / "model") == base, stage


def test_distill_takes_a_teacher_whose_embedding_is_padded_to_another_size(runs, bases):
    """Qwen2.5-7B pads its embedding to 152064 rows, Qwen2.5-0.5B / 1.5B / 3B and Qwen3 to 151936, all
    over the same 151665-token tokenizer: the usual big-teacher / small-student pair. Log-probs
    compare over the tokenizer's ids, which both models share, so distillation must take it."""
    from transformers import AutoConfig

    student, _ = bases["qwen3"]
    teacher = bases["padded_teacher"]
    assert AutoConfig.from_pretrained(teacher).vocab_size != AutoConfig.from_pretrained(student).vocab_size
    assert runs[("qwen3", "1rank")].completed("distill_padded")["metrics"]["steps"] == 1
