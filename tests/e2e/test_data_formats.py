"""Local data formats through the CLI: parquet shards, .jsonl.zst and a save_to_disk directory train
an SFT stage; a second stage on the same data reuses the run's tokenized cache; a bad row in a
compressed file stops the run before anything trains, naming the file and row."""

from __future__ import annotations

import json

import pytest

from tests.conftest import mini_recipe, posttrain, sft_stage, stage_manifest, tiny_rows, write_jsonl

pytestmark = pytest.mark.slow


def _formats(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = tiny_rows("sft_train.jsonl", 96)
    # tulu-3-sft-mixture's columns, and a column a text-only stage ignores
    rows = [{"id": f"r{i}", **r, "source": "tiny", "images": []} for i, r in enumerate(rows)]
    shards = tmp_path / "shards" / "data"
    shards.mkdir(parents=True)
    for k in range(3):
        pq.write_table(pa.Table.from_pylist(rows[k * 16:(k + 1) * 16]), shards / f"train-0000{k}-of-00003.parquet")
    zst = tmp_path / "more.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows[48:80]).encode()))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[80:])}).save_to_disk(str(tmp_path / "saved"))
    return f"[{{path: {tmp_path / 'shards'}}}, {{path: {zst}, weight: 2.0}}, {{path: {tmp_path / 'saved'}}}]"


def test_formats_train_and_share_one_cache(tmp_path):
    data = _formats(tmp_path)
    rec = mini_recipe(tmp_path, stages=[sft_stage("sft", data=data, lr=1.0e-3, max_steps=2),
                                        sft_stage("sft2", data=data, lr=1.0e-3, max_steps=2)])
    r = posttrain("run", f"recipe={rec}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "runs" / "mini"
    for stage in ("sft", "sft2"):
        stats = stage_manifest(run, stage)["metrics"]["data"]
        assert stats["rows"] == 48 + 2 * 32 + 16 and stats["examples"] == stats["rows"]
    assert "128 conversations -> 128 examples" in r.stdout
    # one cache per source, built by the first stage and read by the second
    assert len(list((run / "_cache" / "tokenized").iterdir())) == 3


def test_a_bad_row_in_a_compressed_file_stops_the_run(tmp_path):
    import gzip

    good = tiny_rows("sft_train.jsonl", 20)
    bad = good[:13] + [{"messages": [{"role": "user", "content": [{"type": "image"}]},
                                     {"role": "assistant", "content": "4"}]}] + good[13:]
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(write_jsonl(tmp_path / "x.jsonl", bad).read_bytes()))
    rec = mini_recipe(tmp_path)
    r = posttrain("run", f"recipe={rec}", f"stages.sft2.data=[{{path: {path}}}]", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl.gz: row 14: field 'messages[0].content[0]' is a 'image' part" in err
    assert not list((tmp_path / "runs").glob("*/*/manifest.json"))
