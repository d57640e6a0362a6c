"""SFT tokenization at scale (data/tokenized.py): the same examples in the same order as a row-by-row
loop over the weighted mixture, in worker processes or not; a cache keyed by content, written
atomically, shared by sources with the same bytes; errors that name the file and row."""

from __future__ import annotations

import json

import pytest

from posttrain_cli.data import sources, tokenized
from posttrain_cli.data.chat import apply_truncation, tokenize_conversation
from posttrain_cli.data.schemas import sft_messages
from posttrain_cli.errors import UserError


@pytest.fixture(scope="module")
def tok():
    from posttrain_cli.models.tiny import build_tokenizer

    return build_tokenizer()


def _row(i: int) -> dict:
    turns = [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": str(2 * i) * (1 + i % 7)}]
    if i % 5 == 0:
        turns += [{"role": "user", "content": "again"}, {"role": "assistant", "content": "ok" * (i % 9)}]
    return {"id": f"r{i}", "messages": turns, "source": "synthetic"}


def _src(path, weight=1.0):
    return {"path": str(path), "from": None, "split": "train", "name": None, "weight": weight}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reference(tok, srcs, seed, max_len, truncation):
    """Today's loop: load_mixture, then every conversation's examples in order."""
    rows = sources.load_mixture(srcs, "d", sft_messages, seed)
    out, dropped, truncated = [], 0, 0
    for messages in rows:
        for ex in tokenize_conversation(tok, messages, "each"):
            ex = apply_truncation(ex, max_len, truncation)
            if ex is None:
                dropped += 1
                continue
            truncated += ex.truncated
            out.append((ex.input_ids, ex.loss_mask))
    stats = {"rows": len(rows), "truncated": truncated, "dropped": dropped, "examples": len(out),
             "tokens": sum(len(i) for i, _ in out), "loss_tokens": sum(sum(m) for _, m in out)}
    return out, stats


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
@pytest.mark.parametrize("workers", [1, 2])
def test_same_examples_same_order_as_a_row_loop(tmp_path, tok, monkeypatch, truncation, workers):
    monkeypatch.setattr(sources, "CHUNK_ROWS", 16)
    a = _write(tmp_path / "a.jsonl", [_row(i) for i in range(100)])
    b = _write(tmp_path / "b.jsonl", [_row(i) for i in range(100, 140)])
    srcs = [_src(a, 1.5), _src(b, 0.5)]
    spec = tokenized.SftTokenization(tok, 16, truncation)
    caches = tokenized.locate(srcs, "d", spec, tmp_path / "cache")
    for c in caches:
        c.build(workers=workers)
    examples, stats = tokenized.mixture(caches, seed=3)
    want, want_stats = _reference(tok, srcs, 3, 16, truncation)
    assert stats == want_stats
    assert len(examples) == len(want) and [examples[i] for i in range(len(want))] == want
    ids, mask = examples[0]
    assert type(ids[0]) is int and type(mask[0]) is bool


def test_cache_key_follows_content_and_settings(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", [_row(i) for i in range(10)])
    copy = _write(tmp_path / "copy.jsonl", [_row(i) for i in range(10)])
    spec = tokenized.SftTokenization(tok, 32, "truncate")

    def key(path, spec=spec):
        return tokenized.locate([_src(path)], "d", spec, tmp_path / "cache")[0].key

    assert key(a) == key(copy)  # the same bytes elsewhere: the same cache
    assert key(a) != key(a, tokenized.SftTokenization(tok, 33, "truncate"))
    assert key(a) != key(a, tokenized.SftTokenization(tok, 32, "drop"))
    assert key(a) != key(a, tokenized.SftTokenization(tok, 32, "truncate", "last"))
    tok2 = _copy_tokenizer(tok, tmp_path)
    assert key(a) == key(a, tokenized.SftTokenization(tok2, 32, "truncate"))  # a saved copy: the same
    tok2.chat_template = tok.chat_template + " "
    assert key(a) != key(a, tokenized.SftTokenization(tok2, 32, "truncate"))
    tok2.chat_template = tok.chat_template
    tok2.add_tokens(["<extra>"])
    assert key(a) != key(a, tokenized.SftTokenization(tok2, 32, "truncate"))
    _write(a, [_row(i) for i in range(11)])
    assert key(a) != key(copy)


def _copy_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


def test_built_once_then_read_back(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", [_row(i) for i in range(30)])
    spec = tokenized.SftTokenization(tok, 64, "truncate")
    (c,) = tokenized.locate([_src(a)], "d", spec, tmp_path / "cache")
    assert not c.ready()
    c.build()
    assert c.ready() and c.dir.parent == tmp_path / "cache"
    meta = json.loads((c.dir / "meta.json").read_text())
    assert meta["rows"] == 30 and meta["examples"] == 30
    (again,) = tokenized.locate([_src(a)], "d", spec, tmp_path / "cache")
    assert again.ready() and again.dir == c.dir
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [c.key]


def test_a_bad_row_names_file_and_row_and_leaves_no_cache(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_ROWS", 8)
    rows = [_row(i) for i in range(40)]
    rows[33] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]}
    a = _write(tmp_path / "a.jsonl", rows)
    (c,) = tokenized.locate([_src(a)], "d", tokenized.SftTokenization(tok, 64, "truncate"), tmp_path / "cache")
    with pytest.raises(UserError, match=r"a.jsonl: row 34: field 'messages\[1\].content\[0\]' must be a \{type, \.\.\.\} part"):
        c.build(workers=2)
    assert not c.ready() and list((tmp_path / "cache").iterdir()) == []


def test_empty_source_and_progress(tmp_path, tok, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    (c,) = tokenized.locate([_src(empty)], "stages.sft.data", tokenized.SftTokenization(tok, 64, "truncate"),
                            tmp_path / "cache")
    with pytest.raises(UserError, match=r"stages.sft.data\[0\]: .*empty.jsonl has no rows"):
        c.build()

    seen = []

    class Bar:
        def __init__(self, total, what):
            seen.append(("start", total, what))

        def update(self, done, stats):
            seen.append(("update", done, stats["examples"]))

        def close(self):
            seen.append(("close",))

    monkeypatch.setattr(tokenized, "PROGRESS_ROWS", 1)
    monkeypatch.setattr(sources, "CHUNK_ROWS", 10)
    a = _write(tmp_path / "a.jsonl", [_row(i) for i in range(25)])
    (c,) = tokenized.locate([_src(a)], "d", tokenized.SftTokenization(tok, 64, "truncate"), tmp_path / "cache")
    c.build(progress=Bar)
    assert seen[0] == ("start", 25, f"tokenizing {a}") and seen[-1] == ("close",)
    assert [s[1] for s in seen if s[0] == "update"] == [10, 20, 25]


def test_parquet_shards_and_saved_datasets_tokenize_like_jsonl(tmp_path, tok):
    import datasets

    rows = [_row(i) for i in range(20)]
    a = _write(tmp_path / "a.jsonl", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    spec = tokenized.SftTokenization(tok, 64, "truncate")
    got = []
    for path in (a, tmp_path / "saved"):
        caches = tokenized.locate([_src(path)], "d", spec, tmp_path / "cache")
        caches[0].build()
        ex, _ = tokenized.mixture(caches, 0)
        got.append([ex[i] for i in range(len(ex))])
    assert got[0] == got[1]


# ------------------------------------------------------------------ preference rows


def _pref(i: int) -> dict:
    q = {"role": "user", "content": f"{i}+{i}"}
    if i % 7 == 0:
        return {"prompt": f"{i}+{i}", "chosen": "same", "rejected": "same"}  # identical: dropped
    if i % 5 == 0:
        return {"prompt": q["content"], "ranked": [str(2 * i), str(2 * i + 1), "x" * (i % 30)]}
    row = {"id": i, "source": "s", "prompt": q["content"], "chosen": [q, {"role": "assistant", "content": str(2 * i)}],
           "rejected": [q, {"role": "assistant", "content": str(2 * i) + "9" * (i % 40)}],
           "chosen_rating": 5.0, "rejected_rating": 1.0}
    if i % 3:
        row["margin"] = float(i % 4)
    return row


@pytest.mark.parametrize("workers", [1, 2])
def test_preference_rows_and_pairs_match_the_in_memory_path(tmp_path, tok, monkeypatch, workers):
    from posttrain_cli.data import preference

    monkeypatch.setattr(sources, "CHUNK_ROWS", 16)
    a = _write(tmp_path / "a.jsonl", [_pref(i) for i in range(90)])
    b = _write(tmp_path / "b.jsonl", [_pref(i) for i in range(200, 240)])
    srcs = [_src(a, 1.5), _src(b, 0.5)]
    for truncation in ("truncate", "drop"):
        rows, drops = preference.load_rows(srcs, "d", 5, {})
        want, want_stats = preference.tokenize(tok, rows, 24, truncation)
        spec = tokenized.PreferenceTokenization(tok, 24, truncation)
        caches = tokenized.locate(srcs, "d", spec, tmp_path / "cache")
        for c in caches:
            c.build(workers=workers)
        got, stats = tokenized.preference_mixture(caches, 5)
        assert stats == {**drops, **want_stats}
        assert stats["dropped_identical"] and stats["truncated_answers" if truncation == "truncate" else "dropped_too_long"]
        assert [got[i] for i in range(len(got))] == want
        pairs, want_pairs = preference.as_pairs(got), preference.as_pairs(want)
        assert len(pairs) == len(want_pairs) > len(got)
        assert [pairs[i] for i in range(len(pairs))] == [want_pairs[i] for i in range(len(want_pairs))]


def test_preference_margin_missing_names_the_row(tmp_path, tok):
    a = _write(tmp_path / "a.jsonl", [_pref(i) for i in (1, 2, 3, 4)])
    caches = tokenized.locate([_src(a)], "d", tokenized.PreferenceTokenization(tok, 64, "truncate"),
                              tmp_path / "cache")
    caches[0].build()
    with pytest.raises(UserError, match=r"a.jsonl: row 3: field 'margin' missing \(stages.rm.margin is true"):
        tokenized.preference_mixture(caches, 0, margin_key="stages.rm.margin")
    assert tokenized.preference_mixture(caches, 0)[1]["examples"] == 4


def test_a_dead_builds_leftovers_are_removed_and_a_finished_cache_is_kept(tmp_path, tok, monkeypatch):
    a = _write(tmp_path / "a.jsonl", [_row(i) for i in range(5)])
    spec = tokenized.SftTokenization(tok, 64, "truncate")
    (c,) = tokenized.locate([_src(a)], "d", spec, tmp_path / "cache")
    stale = tmp_path / "cache" / f".tmp-{c.key}-999999999-abcdef12"
    stale.mkdir(parents=True)
    c.build()
    assert not stale.exists() and c.ready()
    # another process finished the same cache while this one built: its cache stays
    before = (c.dir / "meta.json").stat().st_mtime_ns
    c.build()
    assert (c.dir / "meta.json").stat().st_mtime_ns == before
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [c.key]


def test_a_hub_dataset_is_keyed_by_its_datasets_fingerprint(tmp_path, tok, monkeypatch):
    """The hub path (load_dataset by name) run on a local directory, no download."""
    import datasets

    rows = [_row(i) for i in range(12)]
    d = tmp_path / "org_dataset"
    d.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(d / "train-00000.parquet"))
    a = _write(tmp_path / "a.jsonl", rows)
    spec = tokenized.SftTokenization(tok, 64, "truncate")
    want, _ = tokenized.mixture(_built(tokenized.locate([_src(a)], "d", spec, tmp_path / "cache")), 0)
    for module in (tokenized, sources):
        monkeypatch.setattr(module, "is_local", lambda path: False)
    caches = tokenized.locate([_src(d)], "d", spec, tmp_path / "cache")
    assert caches[0].signature["hub"] == str(d) and caches[0].signature["fingerprint"]
    got, stats = tokenized.mixture(_built(caches), 0)
    assert stats["rows"] == 12 and [got[i] for i in range(len(got))] == [want[i] for i in range(len(want))]


def _built(caches):
    for c in caches:
        c.build()
    return caches
