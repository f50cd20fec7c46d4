"""Text sources, sentence splitting, tokenised batches and the store format (no model needed)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from capture.batching import EncodedDoc, collate, encode_window, plan_batches, render_tokens
from capture.config import CaptureConfig, SourceConfig
from capture.sources import (SourceStats, count_records, iter_documents, make_splitter, rank_documents,
                             resolve_files, shuffle_buffer)
from capture.store import ActivationStore, FileLock, Manifest, read_tensors, write_shard

SENTENCES = Path(__file__).resolve().parent.parent / "capture" / "data" / "sentences.txt"


def _docs(cfg: SourceConfig) -> tuple[list, SourceStats]:
    stats = SourceStats()
    return list(iter_documents(cfg, stats)), stats


# --------------------------------------------------------------------------- sources
def test_bundled_sentences_are_varied():
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 250 and len(set(lines)) == len(lines) and all(line.strip() for line in lines)
    words = [len(line.split()) for line in lines]
    assert min(words) == 1 and max(words) >= 30


def test_parquet_jsonl_text_and_gzip_in_one_global_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["p0", None, "p1", "  "], "other": [1, 2, 3, 4]}), tmp_path / "a.parquet",
                   row_group_size=2)
    (tmp_path / "b.jsonl").write_text('{"text": "j0"}\n\n{"text": "j1", "x": 1}\n')
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("t0\nt1\n")
    (tmp_path / "ignored.csv").write_text("x\n")
    cfg = SourceConfig(data=(tmp_path,))
    docs, stats = _docs(cfg)
    assert [d.text for d in docs] == ["p0", "p1", "j0", "j1", "t0", "t1"]
    assert [d.doc_id for d in docs] == list(range(6))
    assert stats.files == 3 and stats.empty == 3 and stats.documents == 6  # None, "  ", blank jsonl line
    assert count_records(resolve_files(cfg.data)) is None  # a .gz file would need decompressing
    assert count_records(resolve_files((tmp_path / "a.parquet", tmp_path / "b.jsonl"))) == 7
    # --limit counts documents (after skipping empties), over the whole stream.
    assert [d.text for d in _docs(SourceConfig(data=(tmp_path,), limit=3))[0]] == ["p0", "p1", "j0"]


def test_bad_input_is_counted_not_fatal(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\nnot json\n{"body": "x"}\n{"text": 5}\n{"text": "end"}\n')
    docs, stats = _docs(SourceConfig(data=(path,)))
    assert [d.text for d in docs] == ["ok", "caf\ufffd", "end"]
    assert stats.bad_utf8_replaced == 1 and stats.malformed == 3
    line = stats.problems()
    assert "1 lines with invalid UTF-8 repaired" in line and "3 malformed records" in line and "bad.jsonl:3" in line
    docs, stats = _docs(SourceConfig(data=(path,), bad_utf8="skip"))
    assert [d.text for d in docs] == ["ok", "end"] and stats.bad_utf8_skipped == 1


def test_user_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        resolve_files([tmp_path / "nope.txt"])
    (tmp_path / "x.dat").write_text("a\n")
    with pytest.raises(ValueError, match="--format parquet\\|jsonl\\|text"):
        resolve_files([tmp_path / "x.dat"])
    assert resolve_files([tmp_path / "x.dat"], "text") == [(tmp_path / "x.dat", "text")]
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"sentence": ["a"]}), tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="no column 'text' .*--text-field"):
        _docs(SourceConfig(data=(tmp_path / "s.parquet",)))
    assert _docs(SourceConfig(data=(tmp_path / "s.parquet",), text_field="sentence"))[0][0].text == "a"
    with pytest.raises(ValueError, match="exclude each other"):
        SourceConfig(data=(tmp_path,), chat=True, split_sentences=True)
    with pytest.raises(ValueError, match="--tokens-per-batch .* must be at least --max-tokens"):
        CaptureConfig(ckpt_dir=tmp_path, data=(tmp_path,), sites="L1R", out=tmp_path, tokens_per_batch=100)
    # A transcoder pair is both ends of the MLP, once each.
    pair = CaptureConfig(ckpt_dir=tmp_path, data=(tmp_path,), sites="L1TC,L1M,L0R", out=tmp_path).site_list
    assert [str(s) for s in pair] == ["L1MI", "L1M", "L0R"]


def test_chat_records_are_validated(tmp_path):
    path = tmp_path / "c.jsonl"
    good = [{"role": "user", "content": "hi"}]
    path.write_text("\n".join(json.dumps({"messages": m}) for m in
                              (good, [], [{"role": "robot", "content": "x"}], [{"role": "user"}])) + "\n")
    docs, stats = _docs(SourceConfig(data=(path,), chat=True))
    assert [d.messages for d in docs] == [good] and stats.malformed == 3
    assert "unknown role 'robot'" in stats.problems()


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(1000))
    a = list(shuffle_buffer(iter(items), 64, seed=1))
    assert sorted(a) == items and a != items
    assert a == list(shuffle_buffer(iter(items), 64, seed=1))
    assert a != list(shuffle_buffer(iter(items), 64, seed=2))
    assert list(shuffle_buffer(iter(items), 0, seed=1)) == items
    # Documents are numbered after the shuffle: doc_id follows the shuffled order.
    docs, _ = _docs(SourceConfig(data=(SENTENCES,), shuffle_buffer=50, seed=3))
    lines = SENTENCES.read_text().splitlines()
    assert [d.doc_id for d in docs] == list(range(len(lines))) and sorted(d.text for d in docs) == sorted(lines)
    assert [d.text for d in docs] != lines


def test_rank_split_is_disjoint_and_complete():
    docs, _ = _docs(SourceConfig(data=(SENTENCES,), limit=101))
    for world in (1, 2, 3):
        shares = [[d.doc_id for d in rank_documents(iter(docs), r, world)] for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(101))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("name", ["blingfire", "pysbd"])
def test_sentence_splitting(name, tmp_path):
    pytest.importorskip(name)
    text = ("Dr. Smith arrived at 9 a.m. on Monday. She met the U.N. envoy in Geneva! "
            "Did they agree? Nobody knows.")
    assert [s.strip() for s in make_splitter(name)(text)] == [
        "Dr. Smith arrived at 9 a.m. on Monday.", "She met the U.N. envoy in Geneva!", "Did they agree?",
        "Nobody knows."]
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "One. Two."}) + "\n")
    docs, stats = _docs(SourceConfig(data=(path,), split_sentences=True, splitter=name))
    assert [d.text for d in docs][-2:] == ["One.", "Two."] and len(docs) == 6 and stats.sentences == 6


def test_nltk_without_punkt_data_says_how_to_fix(monkeypatch):
    nltk = pytest.importorskip("nltk")

    def missing(*_a, **_k):
        raise LookupError("punkt_tab")

    monkeypatch.setattr(nltk.data, "find", missing)
    with pytest.raises(ValueError, match="nltk.downloader punkt_tab"):
        make_splitter("nltk")


# --------------------------------------------------------------------------- batching
def test_plan_batches_covers_every_document_once_within_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 193, (500,), generator=g).tolist()
    batches = plan_batches(lengths, 2048)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 2048
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # sorting by length keeps the padding small (unsorted: ~+90%)
    with pytest.raises(ValueError, match="--tokens-per-batch"):
        plan_batches([10, 300], 256)
    # A small window that fits one batch: the padding cap splits it by length instead.
    few = lengths[:40]
    assert len(plan_batches(few, 10**6, max_padding=1.0)) == 1
    capped = plan_batches(few, 10**6, max_padding=0.2)
    assert sorted(i for b in capped for i in b) == list(range(40))
    for b in capped:
        assert min(few[i] for i in b) >= 0.8 * max(few[i] for i in b)


def test_collate_rows_and_bos_skipping():
    docs = [EncodedDoc(7, [1, 2, 3]), EncodedDoc(3, [9]), EncodedDoc(5, [4, 5])]
    b = collate(docs, pad_id=0, skip_first=[True, False, False])
    assert b.tokens.tolist() == [[1, 2, 3], [9, 0, 0], [4, 5, 0]]
    assert b.row_tokens.tolist() == [2, 3, 9, 4, 5]
    assert b.row_doc_ids.tolist() == [7, 7, 3, 5, 5] and b.row_positions.tolist() == [1, 2, 0, 0, 1]
    assert b.keep.sum().item() == 5 and b.real_tokens == 6 and b.padded_tokens == 9


def test_encode_window_truncates_and_counts():
    from capture.sources import Document

    class Tok:
        bos_id = 100

        def encode(self, s, *, bos, eos):
            return ([self.bos_id] if bos else []) + [ord(c) for c in s]

    counters: dict[str, int] = {}
    out = encode_window([Document(0, "abcdef", None), Document(1, "ab", None)], Tok(), None, bos=True,
                        max_tokens=4, counters=counters)
    assert [e.ids for e in out] == [[100, 97, 98, 99], [100, 97, 98]]
    assert counters == {"truncated_docs": 1, "truncated_tokens": 3}
    assert render_tokens(Document(2, "a", None), Tok(), None, bos=False) == [97]


# --------------------------------------------------------------------------- store
def test_shard_roundtrip_manifest_and_corruption(tmp_path):
    acts = torch.randn(5, 8).to(torch.bfloat16)
    entry = write_shard(tmp_path / "shard-000000.safetensors", acts, torch.arange(5), torch.zeros(5, dtype=torch.long),
                        torch.arange(5), site="L1R")
    assert entry["rows"] == 5 and len(entry["sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.safetensors"]  # no temporary left
    Manifest(d_model=8, dtype="bfloat16", site="L1R", model="m", shards=[entry]).write(tmp_path)
    store = ActivationStore(tmp_path)
    t = store.read_shard(0, verify=True)
    assert torch.equal(t["activations"], acts) and t["tokens"].dtype == torch.int32
    assert t["doc_ids"].dtype == torch.int64 and t["positions"].dtype == torch.int32
    assert store.num_rows == 5 and store.dtype == torch.bfloat16 and store.stats() is None
    path = store.shard_path(0)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the manifest"):
        store.read_shard(0, verify=True)
    with pytest.raises(ValueError, match="not an activation store"):
        ActivationStore(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format is 'other'"):
        ActivationStore(tmp_path / "bad")
    assert read_tensors(path)["activations"].shape == (5, 8)


def test_file_lock_is_exclusive(tmp_path):
    a, b = FileLock(tmp_path / "lock"), FileLock(tmp_path / "lock")
    a.acquire(exclusive=False, timeout=1)
    b.acquire(exclusive=False, timeout=1)  # shared with shared: fine
    b.release()
    with pytest.raises(ValueError, match="another process is still writing"):
        b.acquire(exclusive=True, timeout=0.1)
    a.release()
    b.acquire(exclusive=True, timeout=1)
    b.release()
