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


# ------------------------------------------------------------------ compressed JSONL, shards, save_to_disk


def test_compressed_jsonl_and_errors_name_file_and_row(tmp_path):
    import gzip

    import zstandard

    body = (json.dumps(ROW) + "\n") * 3
    gz, zst = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.zst"
    gz.write_bytes(gzip.compress(body.encode()))
    zst.write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    assert len(load_source(_src(gz), "d", sft_messages)) == 3
    assert len(load_source(_src(zst), "d", sft_messages)) == 3
    assert len(load_source(_src(tmp_path), "d", sft_messages)) == 6
    bad = tmp_path / "bad.jsonl.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress((body + '{"messages": 1}\n').encode()))
    with pytest.raises(UserError, match=r"bad.jsonl.zst: row 4: field 'messages' must be a non-empty list"):
        load_source(_src(bad), "d", sft_messages)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(body.encode())[:-12])
    with pytest.raises(UserError, match="broken.jsonl.gz: cannot read") as e:
        load_source(_src(broken), "d", sft_messages)
    assert "\n" not in str(e.value)


def test_zst_without_zstandard_is_one_line(tmp_path, monkeypatch):
    import sys

    f = tmp_path / "a.jsonl.zst"
    f.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(UserError) as e:
        load_source(_src(f), "d", sft_messages)
    assert str(e.value) == f"{f}: reading .zst files needs the zstandard package (pip install zstandard)"


def test_a_directory_of_parquet_shards_reads_in_path_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    for k in (1, 0, 2):
        rows = [{"messages": [{"role": "user", "content": f"{k}-{i}"}, {"role": "assistant", "content": "a"}]}
                for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / f"train-0000{k}-of-00003.parquet")
    # a hub snapshot's metadata and hidden folders are no data
    (tmp_path / "dataset_infos.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.json").write_text("{}")
    got = load_source(_src(tmp_path), "d", sft_messages)
    assert [r[0]["content"] for r in got] == [f"{k}-{i}" for k in range(3) for i in range(3)]
    bad = [{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "data" / "train-00003-of-00004.parquet")
    with pytest.raises(UserError, match=r"train-00003-of-00004.parquet: row 1: field 'messages\[1\].role'='bot'"):
        load_source(_src(tmp_path), "d", sft_messages)


def test_save_to_disk_directories(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([ROW] * 4)
    ds.save_to_disk(str(tmp_path / "one"))
    assert len(load_source(_src(tmp_path / "one"), "d", sft_messages)) == 4
    datasets.DatasetDict({"train": ds, "test": ds.select(range(1))}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_source(_src(tmp_path / "dict"), "d", sft_messages)) == 4
    assert len(load_source({**_src(tmp_path / "dict"), "split": "test"}, "d", sft_messages)) == 1
    with pytest.raises(UserError, match=r"stages.sft.data\[0\]: .*dict has no split 'dev' \(it has train, test\)"):
        load_source({**_src(tmp_path / "dict"), "split": "dev"}, "stages.sft.data[0]", sft_messages)
    bad = datasets.Dataset.from_list([ROW, {"messages": [{"role": "user", "content": "q"}]}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(UserError, match=r"bad: row 2: field 'messages' has no assistant turn"):
        load_source(_src(tmp_path / "bad"), "d", sft_messages)


# ------------------------------------------------------------------ streaming checks in worker processes


def test_map_chunks_keeps_order_and_raises_the_first_error():
    from posttrain_cli.data.sources import map_chunks

    assert list(map_chunks(range(50), abs, workers=2)) == list(range(50))
    with pytest.raises(ValueError, match="-3"):
        list(map_chunks([1, 2, -3, 4, -5] + list(range(20)), _fail_negative, workers=2))


def _fail_negative(x):
    if x < 0:
        raise ValueError(str(x))
    return x


def test_source_rows_checks_everything_first_and_holds_nothing(tmp_path, monkeypatch):
    from posttrain_cli.data import sources

    monkeypatch.setattr(sources, "CHUNK_ROWS", 7)
    f = tmp_path / "a.jsonl"
    f.write_text((json.dumps(ROW) + "\n") * 40)
    rows = sources.SourceRows(_src(f), "d", sft_messages, workers=2)
    assert len(rows) == 40 and sum(1 for _ in rows) == 40 and next(iter(rows)) == ROW["messages"]
    f.write_text((json.dumps(ROW) + "\n") * 30 + "{oops\n" + (json.dumps(ROW) + "\n") * 9)
    with pytest.raises(UserError, match="a.jsonl: row 31: not valid JSON"):
        sources.SourceRows(_src(f), "d", sft_messages, workers=2)
    f.write_text("\n")
    with pytest.raises(UserError, match="a.jsonl has no rows"):
        sources.SourceRows(_src(f), "d", sft_messages, workers=2)


def test_count_rows_for_the_progress_bar(tmp_path):
    import gzip

    import datasets
    import zstandard

    from posttrain_cli.data.sources import count_rows

    body = (json.dumps(ROW) + "\n") * 5 + json.dumps(ROW)  # no newline at the end
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    datasets.Dataset.from_list([ROW] * 4).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "d.json").write_text(json.dumps([ROW] * 2))
    assert count_rows(_src(tmp_path), "d") == 6 + 6 + 4 + 2
    datasets.Dataset.from_list([ROW] * 3).save_to_disk(str(tmp_path / "saved"))
    assert count_rows(_src(tmp_path / "saved"), "d") == 3
