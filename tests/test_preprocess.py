"""Preprocess: float64 statistics against a one-shot reference, Chan merges, and the bounded-memory global
shuffle (no row lost or doubled, order mixed, independent of the worker count)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capture.cli import main_preprocess
from capture.config import PreprocessConfig
from capture.preprocess import RunningStats, merge_all, run_preprocess
from capture.store import FORMAT, VERSION, ActivationStore, Manifest, write_shard


def _make_store(path: Path, shard_rows: list[int], d: int = 48, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """A store of consecutive documents of 1-20 rows, activations with a per-dimension offset and scale."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    offset, scale = torch.randn(d, generator=g) * 3, torch.rand(d, generator=g) * 2 + 0.1
    entries, doc, pos, left = [], 0, 0, int(torch.randint(1, 21, (1,), generator=g))
    for i, n in enumerate(shard_rows):
        acts = (torch.randn(n, d, generator=g) * scale + offset).to(dtype)
        docs, poss = [], []
        for _ in range(n):
            docs.append(doc)
            poss.append(pos)
            pos, left = pos + 1, left - 1
            if left == 0:
                doc, pos, left = doc + 1, 0, int(torch.randint(1, 21, (1,), generator=g))
        tokens = torch.randint(0, 1000, (n,), generator=g)
        entries.append(write_shard(path / f"shard-{i:06d}.safetensors", acts, tokens, torch.tensor(docs),
                                   torch.tensor(poss), site="L3R"))
    manifest = {"format": FORMAT, "version": VERSION, "d_model": d, "dtype": str(dtype).split(".")[-1],
                "site": "L3R", "model": "synthetic", "shards": entries, "num_rows": sum(shard_rows)}
    Manifest.from_dict(manifest).write(path)
    return manifest


def _reference(x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.double()
    return {"mean": x.mean(0), "var": x.var(0, unbiased=False), "mean_norm": x.norm(dim=1).mean(),
            "mean_sq_norm": x.pow(2).sum(1).mean()}


def test_running_stats_match_float64_reference_for_any_chunking():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1000, 16, generator=g) * 5 + 100).to(torch.bfloat16)  # large mean: naive sums would lose digits
    ref = _reference(x)
    for chunk in (1, 7, 128, 1000, 5000):
        t = RunningStats.of(x, chunk_rows=chunk).tensors()
        torch.testing.assert_close(t["mean"], ref["mean"], rtol=1e-13, atol=0)
        torch.testing.assert_close(t["var"], ref["var"], rtol=1e-10, atol=0)
        torch.testing.assert_close(t["mean_norm"][0], ref["mean_norm"], rtol=1e-13, atol=0)
        torch.testing.assert_close(t["mean_sq_norm"][0], ref["mean_sq_norm"], rtol=1e-13, atol=0)
    # Chan merges of uneven pieces (and empty ones) give the statistics of the union.
    cuts = [0, 1, 1, 250, 999, 1000]
    parts = [RunningStats.of(x[a:b]) for a, b in zip(cuts, cuts[1:])]
    merged = merge_all(parts, 16)
    assert merged.count == 1000
    torch.testing.assert_close(merged.var, ref["var"], rtol=1e-10, atol=0)
    torch.testing.assert_close(merged.mean, ref["mean"], rtol=1e-13, atol=0)


def test_preprocess_stats_and_global_shuffle(tmp_path):
    store_dir = tmp_path / "L3R"
    manifest = _make_store(store_dir, [700, 1, 333, 950, 0, 416])
    original = ActivationStore(store_dir).read_all()
    n = original["tokens"].shape[0]
    row_bytes = 48 * 2 + 16
    cfg = PreprocessConfig(store=store_dir, memory_mb=600 * row_bytes / 2**20, workers=1, progress=False, seed=3)
    summary = run_preprocess(cfg)

    # Statistics in the store, equal to a float64 pass over all rows.
    store = ActivationStore(store_dir)
    stats = store.stats()
    ref = _reference(original["activations"])
    torch.testing.assert_close(stats["mean"], ref["mean"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["var"], ref["var"], rtol=1e-10, atol=0)
    torch.testing.assert_close(stats["mean_norm"][0], ref["mean_norm"], rtol=1e-12, atol=0)
    assert int(stats["count"][0]) == n and store.manifest.stats["rows"] == n
    assert store.manifest.shards == manifest["shards"]  # the source shards are untouched

    # The shuffled store: every row exactly once, ...
    shuffled = ActivationStore(summary.shuffled)
    assert summary.shuffled == store_dir / "shuffled" and shuffled.site == "L3R" and shuffled.num_rows == n
    assert len(shuffled.shards) == summary.shards_out >= 4  # the budget of 600 rows forces several buckets
    assert max(s["rows"] for s in shuffled.shards) < 2 * 600
    rows = shuffled.read_all(verify=True)
    key_a = original["doc_ids"] * 100 + original["positions"]
    key_b = rows["doc_ids"] * 100 + rows["positions"]
    ia, ib = torch.argsort(key_a), torch.argsort(key_b)
    for k in ("activations", "tokens", "doc_ids", "positions"):
        assert torch.equal(original[k][ia], rows[k][ib]), k
    # ... in an order that mixes documents: a 64-row batch holds ~64 different documents, and the
    # original order is gone (rank correlation near 0).
    first = rows["doc_ids"][:64].unique().numel()
    assert first > 50, first
    rank = torch.empty(n)
    rank[ib] = torch.arange(n, dtype=torch.float)
    corr = torch.corrcoef(torch.stack([rank[ia], torch.arange(n, dtype=torch.float)]))[0, 1]
    assert abs(corr) < 0.1, corr
    assert shuffled.stats()["mean"].equal(stats["mean"])
    assert not (summary.shuffled / ".tmp").exists()


def test_worker_count_does_not_change_results(tmp_path):
    outs = []
    for workers in (1, 2):
        store_dir = tmp_path / f"w{workers}"
        _make_store(store_dir, [300, 200, 250], seed=5)
        run_preprocess(PreprocessConfig(store=store_dir, memory_mb=0.02, workers=workers, progress=False))
        shuffled = ActivationStore(store_dir / "shuffled")
        outs.append((ActivationStore(store_dir).stats(), [shuffled.read_shard(i) for i in range(len(shuffled.shards))]))
    (stats1, shards1), (stats2, shards2) = outs
    assert stats1.keys() == stats2.keys() and all(torch.equal(stats1[k], stats2[k]) for k in stats1)
    assert len(shards1) == len(shards2) > 1
    for a, b in zip(shards1, shards2):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_rerun_overwrite_and_corruption(tmp_path, capsys):
    store_dir = tmp_path / "L3R"
    _make_store(store_dir, [100, 100])
    assert main_preprocess(["--store", str(store_dir), "--no-progress", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "shuffled store" in printed and f"next: llama3-sae train --store {store_dir / 'shuffled'} --out" in printed
    assert main_preprocess(["--store", str(store_dir), "--no-progress"]) == 0
    assert "already done" in capsys.readouterr().out
    assert main_preprocess(["--store", str(store_dir), "--no-progress", "--overwrite", "--seed", "1",
                            "--workers", "1"]) == 0
    assert json.loads((store_dir / "shuffled" / "manifest.json").read_text())["shuffled"]["seed"] == 1

    # A corrupted shard is caught by its sha256, with a message naming it.
    shard = store_dir / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main_preprocess(["--store", str(store_dir), "--no-progress", "--overwrite", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "shard-000001.safetensors: sha256" in err and "does not match" in err
    assert not (store_dir / "shuffled" / ".tmp").exists()  # no scratch files left behind

    assert main_preprocess(["--store", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "not an activation store" in capsys.readouterr().err


def test_stats_only(tmp_path):
    store_dir = tmp_path / "s"
    _make_store(store_dir, [50])
    summary = run_preprocess(PreprocessConfig(store=store_dir, shuffle=False, progress=False, workers=1))
    assert summary.shuffled is None and not (store_dir / "shuffled").exists()
    assert ActivationStore(store_dir).stats()["count"].item() == 50


def test_bad_options():
    with pytest.raises(ValueError, match="--memory-mb must be > 0"):
        PreprocessConfig(store=Path("x"), memory_mb=0)


def test_a_read_only_store_is_one_line_and_preprocess_runs_once_writable(tmp_path, capsys):
    """A store on a file system remounted read-only (needs root to mount, as CI has): a one-line error that
    names the path; the same command finishes once the file system is writable again."""
    from helpers import remount, small_tmpfs

    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        store = disk / "L3R"
        _make_store(store, [300, 200])
        remount(disk, "ro")
        assert main_preprocess(["--store", str(store), "--no-progress", "--workers", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write" in err[0] and str(store) in err[0] and "read-only" in err[0]
        remount(disk, "rw")
        assert main_preprocess(["--store", str(store), "--no-progress", "--workers", "1"]) == 0
        assert ActivationStore(store).stats() is not None
