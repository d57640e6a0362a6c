"""Bad input caught cheaply (issue 17, section 5): a huge message costs what truncation keeps of it
(data/tokenized.py _bounded), the same examples as tokenizing it whole; a chat template's refusal
found by the pre-flight render (data/render_check.py); the model path rule; a stage whose processes
died is marked failed, one still running is recognised."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from posttrain_cli.data import sources, tokenized
from posttrain_cli.data.chat import apply_truncation, tokenize_conversation, tokenize_response
from posttrain_cli.errors import UserError


@pytest.fixture(scope="module")
def tok():
    from posttrain_cli.models.tiny import build_tokenizer

    return build_tokenizer()


def _examples(tok, messages, max_len, truncation, multi_turn="each"):
    out = []
    for ex in tokenize_conversation(tok, messages, multi_turn):
        ex = apply_truncation(ex, max_len, truncation)
        out.append(None if ex is None else (ex.input_ids, ex.loss_mask, ex.truncated))
    return out


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_a_cut_message_gives_the_examples_of_the_whole_one(tok, truncation):
    """Contents around the cut (2 x max_seq_len x the longest token: 2 x 16 x 13 = 416 characters
    here), in every position of a conversation: the same examples, masks and flags as uncut."""
    spec = tokenized.SftTokenization(tok, 16, truncation)
    limit = 2 * 16 * tokenized._max_token_chars(tok)
    rng = random.Random(0)
    for _ in range(60):
        turns = []
        for _ in range(rng.choice([1, 2])):
            for role in ("user", "assistant"):
                n = rng.choice([3, limit - 1, limit, limit + 1, 3 * limit])
                turns.append({"role": role, "content": "".join(rng.choice("ab 1\n") for _ in range(n))})
        if rng.random() < 0.3:
            turns.insert(0, {"role": "system", "content": "s" * rng.choice([5, 2 * limit])})
        bounded = tokenized._bounded(spec, turns)
        assert all(len(m["content"]) <= limit for m in bounded)
        assert _examples(tok, bounded, 16, truncation) == _examples(tok, turns, 16, truncation)


def test_a_template_that_rewrites_a_long_content_is_tokenized_whole(tok):
    """A template that drops what comes before </think> sees a cut content without its </think>:
    the rendered texts differ, so the row is not cut."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'].split('</think>')[-1] }}</s>"
                       "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    spec = tokenized.SftTokenization(t, 16, "truncate")
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r" * 5000 + "</think>ok"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "fine"}]
    assert tokenized._bounded(spec, long) is long


def test_a_50_mb_row_costs_what_a_short_one_does(tok, tmp_path):
    """Issue 17: one 50 MB message with max_seq_len 64 took 11 GB and minutes; cut, about a second
    (most of it reading the JSON)."""
    spec = tokenized.SftTokenization(tok, 64, "truncate")
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x y " * 12_500_000}]}
    tokenized._init(spec)
    try:
        t0 = time.perf_counter()
        part = tokenized._sft_chunk(sources.Chunk("big.jsonl", 1, lines=[json.dumps(row).encode()]))
        took = time.perf_counter() - t0
    finally:
        tokenized._init(None)
    assert list(part["index"]["tokens"]) == [64] and bool(part["index"]["truncated"][0])
    assert took < 20, took


def test_a_preference_row_with_a_huge_answer(tok):
    spec = tokenized.PreferenceTokenization(tok, 32, "truncate")
    prompt = [{"role": "user", "content": "1+2"}]
    answer = {"role": "assistant", "content": "3" * 4000}
    *p, a = tokenized._bounded(spec, prompt + [answer])
    cut, whole = tokenize_response(tok, p, a), tokenize_response(tok, prompt, answer)
    assert len(a["content"]) < 4000
    got, want = apply_truncation(cut, 32, "truncate"), apply_truncation(whole, 32, "truncate")
    assert (got.input_ids, got.loss_mask) == (want.input_ids, want.loss_mask)


# ------------------------------------------------------------------ the pre-flight render

REFUSING = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
            "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROW = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}
SYSTEM = {"messages": [{"role": "system", "content": "be brief"}, *ROW["messages"]]}


def _src(path):
    return {"path": str(path), "from": None, "split": "train", "name": None, "weight": 1.0}


def _run(template):
    return {"model": {"chat_template": template, "path": "tiny", "revision": None}}


@pytest.mark.parametrize("workers", [1, 2])
def test_the_pre_flight_render_names_file_row_and_message(tmp_path, monkeypatch, workers):
    from posttrain_cli.data.render_check import row_render
    from posttrain_cli.data.schemas import sft_messages

    monkeypatch.setattr(sources, "CHUNK_ROWS", 5)
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [ROW] * 12 + [SYSTEM] + [ROW] * 5))
    check = row_render(_run(REFUSING), ("tiny", {}), "sft", {})
    with pytest.raises(UserError, match=r"chats.jsonl: row 13: model.chat_template: .*System role not supported"):
        sources.SourceRows(_src(f), "d", sft_messages, workers=workers, check=check)
    assert sources._ROW_CHECK is None
    # The check runs in the first pass only; iterating parses without rendering.
    f.write_text(json.dumps(ROW) + "\n")
    assert list(sources.SourceRows(_src(f), "d", sft_messages, workers=workers, check=check)) == [ROW["messages"]]


def test_only_a_template_that_can_refuse_is_rendered():
    from posttrain_cli.data.render_check import row_render

    assert row_render(_run(None), ("tiny", {}), "sft", {}) is None  # the tiny model's own template
    assert row_render(_run("chatml"), ("tiny", {}), "sft", {}) is None
    assert row_render(_run(REFUSING), ("tiny", {}), "prompt", {}) is not None


def test_a_local_model_template_and_its_special_tokens(tmp_path):
    from posttrain_cli.data.render_check import row_render

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ bos_token }}" + REFUSING, "bos_token": {"content": "<bos>"}}))
    check = row_render(_run(None), ("path", str(tmp_path)), "preference", {})
    assert check.tokens == {"bos_token": "<bos>"} and check.label == f"the chat template of {tmp_path}"
    row = {"prompt": SYSTEM["messages"][:2], "responses": [{"role": "assistant", "content": "2"}], "drop": None}
    with pytest.raises(UserError, match="p.jsonl: row 4: .*System role not supported"):
        check(row, "p.jsonl", 4)
    check({**row, "drop": "identical"}, "p.jsonl", 4)  # dropped before tokenizing: not rendered


@pytest.mark.parametrize("value, local", [
    ("meta-llama/Llama-3.1-8B", False), ("gpt2", False), ("./models/llama", True), ("../llama", True),
    ("/models/llama", True), ("~/llama", True), ("a/b/c", True), ("my models/llama", True),
])
def test_the_model_path_rule(value, local):
    from posttrain_cli.pipeline.stagedir import local_model_path

    assert local_model_path(value) is local


def test_the_model_path_rule_with_a_local_first_part(tmp_path, monkeypatch):
    from posttrain_cli.pipeline.stagedir import local_model_path

    monkeypatch.chdir(tmp_path)
    assert not local_model_path("models/llama")
    (tmp_path / "models").mkdir()
    assert local_model_path("models/llama")


# ------------------------------------------------------------------ a stage whose processes died


def test_dead_and_live_processes(tmp_path):
    from posttrain_cli.pipeline import manifest, stagedir

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = {"role": "launcher", "host": stagedir.socket.gethostname(), "pid": child.pid,
                 "start": stagedir._stat(child.pid)[1]}
        manifest.write(tmp_path, {"status": "running", "procs": [alive]})
        assert stagedir.running_procs(tmp_path) == [alive]
        assert stagedir.reap_dead(tmp_path) is None
        # The same pid with another start time is another process.
        assert stagedir._alive({**alive, "start": "1"}) is False
        # On another machine: cannot tell, counted alive.
        assert stagedir._alive({**alive, "host": "elsewhere"}) is None
    finally:
        child.kill()
        child.wait()
    assert stagedir.running_procs(tmp_path) == []
    message = stagedir.reap_dead(tmp_path)
    assert f"({child.pid} on " in message and "died without a word" in message
    m = manifest.read(tmp_path)
    assert m["status"] == "failed" and m["error"] == message
    assert stagedir.reap_dead(tmp_path) is None  # once


def test_a_zombie_counts_as_dead(tmp_path):
    from posttrain_cli.pipeline import stagedir

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(100):
        if stagedir._stat(child.pid) and stagedir._stat(child.pid)[0] == "Z":
            break
        time.sleep(0.05)
    try:
        assert stagedir._alive({"host": stagedir.socket.gethostname(), "pid": child.pid, "start": None}) is False
    finally:
        child.wait()
    assert os.getpid() and stagedir._alive(stagedir.this_process("me")) is True
