"""Data sources: local formats, hub loading code on a local path, mixture weights."""

from __future__ import annotations

import json

import pytest

from posttrain_cli.data.schemas import sft_messages
from posttrain_cli.data.sources import _read_hub, apply_weight, load_mixture, load_source
from posttrain_cli.errors import UserError

ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _src(path, weight=1.0):
    return {"path": str(path), "from": None, "split": "train", "name": None, "weight": weight}


def test_jsonl_json_parquet_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([ROW]))
    pq.write_table(pa.Table.from_pylist([ROW, ROW, ROW]), tmp_path / "c.parquet")
    assert len(load_source(_src(tmp_path / "a.jsonl"), "d", sft_messages)) == 2
    assert len(load_source(_src(tmp_path / "b.json"), "d", sft_messages)) == 1
    assert len(load_source(_src(tmp_path / "c.parquet"), "d", sft_messages)) == 3
    assert len(load_source(_src(tmp_path), "d", sft_messages)) == 6


def test_row_numbers_in_errors_skip_nothing(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(ROW) + "\n" + json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    with pytest.raises(UserError, match=r"x.jsonl: row 2: field 'messages\[0\].content' must be a string"):
        load_source(_src(f), "d", sft_messages)


def test_hub_loader_on_a_local_dataset_directory(tmp_path):
    """The `datasets` path (hub names) exercised on a local directory, no download."""
    import datasets

    d = tmp_path / "org_dataset"
    d.mkdir()
    datasets.Dataset.from_list([ROW] * 5).to_parquet(str(d / "train-00000.parquet"))
    rows = [sft_messages(r, "hub", n) for n, r in _read_hub(_src(d), "d")]
    assert len(rows) == 5 and rows[0][1]["content"] == "a"


def test_hub_loader_error_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot load dataset") as e:
        list(_read_hub(_src(tmp_path / "missing" / "thing"), "stages.sft.data[0]"))
    assert "\n" not in str(e.value)


def test_mixture_weights():
    rows = list(range(10))
    assert apply_weight(rows, 1.0, 0) == rows
    assert apply_weight(rows, 2.0, 0) == rows + rows
    half = apply_weight(rows, 0.5, 0)
    assert len(half) == 5 and set(half) <= set(rows) and half == apply_weight(rows, 0.5, 0)
    assert len(apply_weight(rows, 1.3, 0)) == 13


def test_load_mixture_concatenates_weighted(tmp_path):
    (tmp_path / "a.jsonl").write_text((json.dumps(ROW) + "\n") * 4)
    (tmp_path / "b.jsonl").write_text((json.dumps({"prompt": "p", "completion": "c"}) + "\n") * 2)
    rows = load_mixture([_src(tmp_path / "a.jsonl", 0.5), _src(tmp_path / "b.jsonl", 3.0)], "d",
                        sft_messages, seed=0)
    assert len(rows) == 2 + 6
