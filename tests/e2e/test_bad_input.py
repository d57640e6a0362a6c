"""Bad input through the CLI: exit 2, one line naming the key/file/row/stage, nothing trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import mini_recipe, posttrain, write_jsonl, write_recipe


def _check(result, *needles, run_dir=None):
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.stdout + result.stderr
    for n in needles:
        assert n in err, err
    if run_dir is not None:
        assert not list(run_dir.glob("*/model")), "a stage published a model"
        assert not list(run_dir.glob("*/manifest.json")), "a stage started"


def test_malformed_yaml(tmp_path):
    rec = write_recipe(tmp_path, "name: x\nstages:\n  sft:\n    kind: sft\n   lr: 1\n")
    _check(posttrain("run", f"recipe={rec}", cwd=tmp_path), "malformed YAML", "mini.yaml", "line")


def test_unknown_key(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", "stages.sft.learning_rate=1e-4", cwd=tmp_path),
           "stages.sft.learning_rate", run_dir=tmp_path / "runs")


def test_unknown_kind(tmp_path):
    rec = mini_recipe(tmp_path)
    rec.write_text(rec.read_text().replace("kind: sft", "kind: spf", 1))
    _check(posttrain("run", f"recipe={rec}", cwd=tmp_path), "stages.sft.kind", "unknown stage kind 'spf'")


def test_bad_from(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", "stages.sft2.from=nothere", cwd=tmp_path),
           "stages.sft2.from='nothere'", run_dir=tmp_path / "runs")


def test_from_later_stage(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", "stages.sft.from=sft2", cwd=tmp_path), "stages.sft.from", "sft2")


def test_missing_data_file(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", f"stages.sft2.data=[{{path: {tmp_path}/nope.jsonl}}]", cwd=tmp_path),
           "stages.sft2.data[0]", "not found", "nope.jsonl", run_dir=tmp_path / "runs")


def test_row_missing_messages(tmp_path):
    rec = mini_recipe(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]},
        {"text": "no messages here"},
    ])
    # The bad file feeds the second stage: it is caught before the first one trains.
    _check(posttrain("run", f"recipe={rec}", f"stages.sft2.data=[{{path: {bad}}}]", cwd=tmp_path),
           "bad.jsonl: row 2", "field 'messages' missing", run_dir=tmp_path / "runs")


def test_bad_role(tmp_path):
    rec = mini_recipe(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "human", "content": "hi"}]}])
    _check(posttrain("run", f"recipe={rec}", f"stages.sft.data=[{{path: {bad}}}]", cwd=tmp_path),
           "bad.jsonl: row 1", "messages[0].role")


def test_invalid_json_row(tmp_path):
    rec = mini_recipe(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": [', ])
    _check(posttrain("run", f"recipe={rec}", f"stages.sft.data=[{{path: {bad}}}]", cwd=tmp_path),
           "bad.jsonl: row 1", "not valid JSON")


def test_empty_dataset(tmp_path):
    rec = mini_recipe(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _check(posttrain("run", f"recipe={rec}", f"stages.sft.data=[{{path: {empty}}}]", cwd=tmp_path),
           "stages.sft.data[0]", "empty.jsonl", "no rows", run_dir=tmp_path / "runs")


def test_eval_row_missing_ground_truth(tmp_path):
    rec = mini_recipe(tmp_path)
    bad = write_jsonl(tmp_path / "ev.jsonl", [{"messages": [{"role": "user", "content": "1+1"}]}])
    _check(posttrain("run", f"recipe={rec}", f"stages.sft.eval.data=[{{path: {bad}}}]", cwd=tmp_path),
           "ev.jsonl: row 1", "ground_truth")


def test_non_dividing_batch(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", "stages.sft.global_batch_size=12", cwd=tmp_path),
           "stages.sft.global_batch_size=12", "micro_batch_size 8 x 1 rank(s) = 8", run_dir=tmp_path / "runs")


def test_dataset_smaller_than_one_batch(tmp_path):
    rec = mini_recipe(tmp_path)
    small = write_jsonl(tmp_path / "small.jsonl", [
        {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}] * 3)
    r = posttrain("run", f"recipe={rec}", f"stages.sft.data=[{{path: {small}}}]", "stages.sft.max_steps=null",
                  cwd=tmp_path)
    # Found only once the worker tokenized the data: the stage is marked failed, nothing published.
    _check(r, "stages.sft", "3 examples make no optimizer step")
    assert not list((tmp_path / "runs").glob("*/*/model"))
    m = json.loads((tmp_path / "runs" / "mini" / "sft" / "manifest.json").read_text())
    assert m["status"] == "failed" and "no optimizer step" in m["error"]


@pytest.mark.parametrize("args,needle", [
    (["recipe=nosuch"], "no such recipe"),
    (["stages.sft.lr=1"], "name a recipe"),
    (["recipe=tiny", "deepspeed=zero7"], "zero7"),
])
def test_usage_errors(tmp_path, args, needle):
    _check(posttrain("run", *args, cwd=tmp_path), needle)


def test_plan_reports_errors_the_same_way(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("plan", f"recipe={rec}", "stages.sft.global_batch_size=12", cwd=tmp_path),
           "does not divide")


def test_status_of_a_non_run(tmp_path):
    _check(posttrain("status", str(tmp_path), cwd=tmp_path), "not a posttrain run directory")




# ------------------------------------------------------------------ issue 17: every input class, one table
#
# Each case: what the user types, the exit code, the one line that names the key / file / row, no
# traceback, and what is left on disk. All stop before anything starts (`plan`, or `run` before any
# stage); a stage that dies hard and Ctrl-C need a real run (tests/e2e/test_crash_safety.py).

REFUSING = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
            "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}


def _system_turn_in_row_6(tmp):
    rows = [CHAT] * 5 + [{"messages": [{"role": "system", "content": "be brief"}, *CHAT["messages"]]}] + [CHAT] * 3
    (tmp / "refuse.jinja").write_text(REFUSING)
    data = write_jsonl(tmp / "sys.jsonl", rows)
    return ["run", f"model.chat_template={tmp / 'refuse.jinja'}", f"stages.sft2.data=[{{path: {data}}}]"]


def _latin1_row(tmp):
    (tmp / "latin1.jsonl").write_bytes(json.dumps(CHAT).encode() + b"\n" +
                                       '{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    return ["run", f"stages.sft.data=[{{path: {tmp / 'latin1.jsonl'}}}]"]


def _binary_jsonl(tmp):
    (tmp / "blob.jsonl").write_bytes(bytes(range(256)) * 4)
    return ["run", f"stages.sft2.data=[{{path: {tmp / 'blob.jsonl'}}}]"]


def _utf16_recipe(tmp):
    rec = tmp / "mini.yaml"
    (tmp / "u16.yaml").write_bytes(rec.read_text().encode("utf-16"))
    return ["plan", f"recipe={tmp / 'u16.yaml'}"]


def _run_dir_file(tmp):
    (tmp / "taken").write_text("mine\n")
    return ["run", f"run_dir={tmp / 'taken'}"]


def _duplicate_stage(tmp):
    rec = tmp / "mini.yaml"
    lines = rec.read_text().splitlines()
    second = lines.index("  sft2:")
    (tmp / "dup.yaml").write_text("\n".join(lines[:second] + ["  sft:"] + lines[second + 1:]) + "\n")
    return ["plan", f"recipe={tmp / 'dup.yaml'}"], f"line {lines.index('  sft:') + 1} and line {second + 1}"


def _truncated_resolved(tmp):
    run_dir = tmp / "runs" / "mini"
    run_dir.mkdir(parents=True)
    (run_dir / "resolved.yaml").write_text("# posttrain: resolved from mini.yaml\nname: mini\nmodel: {path: ti")
    return ["status", str(run_dir)]


def _resolved_without_stages(tmp):
    run_dir = tmp / "runs" / "mini"
    run_dir.mkdir(parents=True)
    (run_dir / "resolved.yaml").write_text("# posttrain: resolved from mini.yaml\nname: mini\n")
    return ["status", str(run_dir)]


def _models_dir(tmp):
    (tmp / "models").mkdir()
    return ["run", "model.path=models/llama"]


NOTHING = "nothing"  # no stage started: no manifest, no model, no stage folder


def _case(id, make, needles, *, code=2, env=None, left=NOTHING):
    return pytest.param(make, needles, code, env or {}, left, id=id)


TABLE = [
    _case("template-refuses-a-row", _system_turn_in_row_6,
          ("sys.jsonl: row 6", "model.chat_template", "System role not supported")),
    _case("jsonl-row-not-utf8", _latin1_row, ("latin1.jsonl: row 2", "not UTF-8", "0xe9")),
    _case("binary-file-named-jsonl", _binary_jsonl, ("blob.jsonl: row 1", "NUL bytes")),
    _case("invalid-json-row", lambda tmp: ["run", f"stages.sft.data=[{{path: {write_jsonl(tmp / 'b.jsonl', ['{oops'])}}}]"],
          ("b.jsonl: row 1", "not valid JSON")),
    _case("recipe-utf16", _utf16_recipe, ("u16.yaml", "UTF-16")),
    _case("duplicate-stage-key", _duplicate_stage, ("dup.yaml", "key 'stages.sft' is given twice")),
    _case("tiny-arch-misspelt", lambda tmp: ["plan", "model.tiny.hiden_size=16"],
          ("model.tiny.hiden_size", "did you mean 'hidden_size'", "num_attention_heads")),
    _case("run-dir-empty", lambda tmp: ["run", "run_dir="], ("run_dir is empty",)),
    _case("run-dir-root", lambda tmp: ["run", "run_dir=/"], ("run_dir=/", "filesystem root")),
    _case("run-dir-is-a-file", _run_dir_file, ("run_dir=", "taken is a file"), left="taken"),
    _case("run-dir-under-a-file", lambda tmp: _run_dir_file(tmp)[:1] + [f"run_dir={tmp / 'taken' / 'x'}"],
          ("which is a file",), left="taken"),
    _case("model-path-relative-missing", lambda tmp: ["run", "model.path=./models/llama"],
          ("model.path: model directory not found: ./models/llama",)),
    _case("model-path-first-part-exists", _models_dir, ("model.path: model directory not found: models/llama",)),
    _case("model-hub-id-offline-not-cached", lambda tmp: ["run", "model.path=nobody-here/no-model"],
          ("model.path=nobody-here/no-model", "not in the hub cache"), env={"HF_HUB_OFFLINE": "1"}),
    _case("missing-data-file", lambda tmp: ["run", f"stages.sft2.data=[{{path: {tmp}/nope.jsonl}}]"],
          ("stages.sft2.data[0]", "not found")),
    _case("status-resolved-truncated", _truncated_resolved, ("resolved.yaml: unreadable", "truncated?"), left=None),
    _case("status-resolved-without-stages", _resolved_without_stages, ("resolved.yaml: unreadable", "no stages"),
          left=None),
]


@pytest.mark.parametrize("make, needles, code, env, left", TABLE)
def test_bad_input_table(tmp_path, make, needles, code, env, left):
    rec = mini_recipe(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    root_before = os.path.exists("/resolved.yaml")
    made = make(tmp_path)
    args, extra = (made, ()) if isinstance(made, list) else (made[0], (made[1],))
    command, *rest = args
    if command != "status" and not any(a.startswith("recipe=") for a in rest):
        rest = [f"recipe={rec}", *rest]
    r = posttrain(command, *rest, cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf"), **env})
    assert r.returncode == code, r.stdout + r.stderr
    _check(r, *needles, *extra)
    # What is left: nothing a stage wrote, nothing in the current directory or under run_dir.
    new = {p for p in tmp_path.rglob("*")} - before
    written = [p for p in new if p.is_file() and p.suffix not in (".jsonl", ".yaml", ".jinja")
               and "hf" not in p.relative_to(tmp_path).parts]
    if left == NOTHING:
        assert not written, written
        assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("manifest.json"))
        assert not (tmp_path / "sft").exists() and not (tmp_path / "resolved.yaml").exists()
    elif left == "taken":
        assert (tmp_path / "taken").read_text() == "mine\n"
    assert root_before or not os.path.exists("/resolved.yaml"), "a run wrote into /"


def _fake_done(tmp, rec, *overrides):
    """Every stage of `rec` recorded completed under the fingerprint a run computes (a model folder as
    its output) and resolved.yaml as a run writes it: a finished run without the training."""
    from posttrain_cli.config.compose import compose
    from posttrain_cli.pipeline import manifest, runner

    cfg, path = compose([f"recipe={rec}", *overrides])
    for step in runner.plan(cfg):
        (step.stage_dir / "model").mkdir(parents=True)
        (step.stage_dir / "model" / "config.json").write_text("{}")
        manifest.write(step.stage_dir, {"status": "completed", "kind": step.node.kind, "fingerprint": step.fingerprint,
                                        "eval_fingerprint": step.eval_fingerprint, "outputs": {"model": "model"}})
    runner.write_resolved(cfg, path)
    return Path(cfg["run_dir"])


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_a_bad_later_stage_leaves_the_completed_ones_untouched(tmp_path):
    rec = mini_recipe(tmp_path)
    run_dir = _fake_done(tmp_path, rec)
    before = _snapshot(run_dir)
    args = _system_turn_in_row_6(tmp_path)
    _check(posttrain(*args[:1], f"recipe={rec}", *args[1:], cwd=tmp_path), "sys.jsonl: row 6", "System role")
    assert _snapshot(run_dir) == before


def _read_only(run_dir: Path, *args: str, cwd: Path):
    """`posttrain ARGS` with run_dir mounted read-only (a private mount namespace: root, or skip)."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private read-only mount here (unshare -m: {probe.stderr.decode().strip()})")
    exe = Path(sys.executable).parent / "posttrain"
    script = f'mount --bind -o ro "{run_dir}" "{run_dir}" && exec "{exe}" "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)


def test_read_only_run_dir(tmp_path):
    """Every stage done: nothing to write, so the run reports everything done (exit 0). A stage to
    run: one line before anything starts (exit 2). The run_dir is the same afterwards."""
    rec = mini_recipe(tmp_path)
    run_dir = _fake_done(tmp_path, rec)
    before = _snapshot(run_dir)
    r = _read_only(run_dir, "run", f"recipe={rec}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[sft] skipped" in r.stdout and "[sft2] skipped" in r.stdout and "Traceback" not in r.stdout + r.stderr
    r = _read_only(run_dir, "run", f"recipe={rec}", "stages.sft2.lr=2.0e-3", cwd=tmp_path)
    _check(r, f"run_dir={run_dir}: cannot write there (Read-only file system)")
    assert _snapshot(run_dir) == before
