"""Training data: memory-mapped store reading, the random held-out split, the seeded epoch order, rank
slices of the global batch, and the background prefetcher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.store import ActivationStore
from llama3_sae.prefetch import Prefetcher
from training.data import StoreRows, TrainStream, mmap_safetensor, val_batches
from training.synthetic import write_store


def _store(tmp_path, n=1000, d=8, shard_rows=130, dtype=torch.bfloat16):
    # Row i holds the value i in every column, so a row read back names itself (exact in bf16 up to 256,
    # so the id is also stored split into two small numbers).
    ids = torch.arange(n, dtype=torch.float32)
    x = torch.zeros(n, d)
    x[:, 0], x[:, 1] = ids // 100, ids % 100
    x[:, 2:] = torch.randn(n, d - 2, generator=torch.Generator().manual_seed(0))
    return write_store(tmp_path / "store", x, shard_rows=shard_rows, dtype=dtype, stats=False), x


def _row_ids(batch: torch.Tensor) -> np.ndarray:
    return (batch[:, 0] * 100 + batch[:, 1]).round().long().numpy()


def test_memory_map_reads_the_same_bytes_as_the_store_reader(tmp_path):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        path, _ = _store(tmp_path / str(dtype), n=300, dtype=dtype)
        store = ActivationStore(path)
        arr, got_dtype = mmap_safetensor(store.shard_path(1), "activations")
        assert isinstance(arr, np.memmap) and got_dtype == dtype
        ref = store.read_shard(1)["activations"]
        assert torch.equal(torch.from_numpy(np.array(arr)).view(dtype), ref)
        rows = StoreRows(path, val_fraction=0.1, val_max_rows=1000, seed=0)
        ids = np.array([299, 0, 131, 130, 5, 5])  # any order, repeats, across shard borders
        assert torch.equal(rows.gather(ids), store.read_all()["activations"][torch.from_numpy(ids)])


def test_held_out_rows_are_random_disjoint_and_seeded(tmp_path):
    path, _ = _store(tmp_path)
    a = StoreRows(path, val_fraction=0.1, val_max_rows=10_000, seed=0)
    assert len(a.val_ids) == 100 and len(np.unique(a.val_ids)) == 100
    assert a.num_train_rows == 900 and a.train_counts.sum() == 900
    # Spread over the whole store, not the last shards (the original project split by file name).
    shards_hit = np.unique(np.searchsorted(a.offsets, a.val_ids, side="right") - 1)
    assert len(shards_hit) >= 6
    assert np.array_equal(StoreRows(path, val_fraction=0.1, val_max_rows=10_000, seed=0).val_ids, a.val_ids)
    assert not np.array_equal(StoreRows(path, val_fraction=0.1, val_max_rows=10_000, seed=1).val_ids, a.val_ids)
    assert len(StoreRows(path, val_fraction=0.1, val_max_rows=7, seed=0).val_ids) == 7
    train = np.concatenate([a.train_rows_of_shard(s) for s in range(len(a.train_counts))])
    assert not set(train) & set(a.val_ids.tolist())
    assert len(train) + len(a.val_ids) == 1000
    held = np.concatenate([_row_ids(b) for b in val_batches(a, 33)])
    assert np.array_equal(held, a.val_ids)
    parts = [np.concatenate([_row_ids(b) for b in val_batches(a, 16, part=r, n_parts=3)]) for r in range(3)]
    assert np.array_equal(np.sort(np.concatenate(parts)), a.val_ids)


def test_every_training_row_once_per_epoch_and_batches_straddle_epochs(tmp_path):
    path, _ = _store(tmp_path)
    rows = StoreRows(path, val_fraction=0.1, val_max_rows=10_000, seed=0)
    stream = TrainStream(rows, batch_size=64, shuffle_window=3, seed=5)
    steps = 3 * 900 // 64 + 1  # a bit over three epochs
    seen = np.concatenate([_row_ids(stream.batch(s)) for s in range(steps)])
    train = set(range(1000)) - set(rows.val_ids.tolist())
    for e in range(3):
        epoch = seen[e * 900:(e + 1) * 900]
        assert sorted(epoch.tolist()) == sorted(train), f"epoch {e} is not a permutation of the training rows"
    assert not np.array_equal(seen[:900], seen[900:1800])  # reshuffled every epoch
    # Windows of 3 shards are mixed: the first 100 rows come from several shards.
    assert len(np.unique(np.searchsorted(rows.offsets, seen[:100], side="right") - 1)) > 1
    # A batch depends only on (seed, step): a fresh stream (a resumed run) reads the same rows.
    again = TrainStream(rows, batch_size=64, shuffle_window=3, seed=5)
    assert np.array_equal(again.batch_ids(steps - 1), stream.batch_ids(steps - 1))


def test_rank_slices_make_up_the_single_process_batch(tmp_path):
    path, _ = _store(tmp_path)
    rows = StoreRows(path, val_fraction=0.1, val_max_rows=10_000, seed=0)
    single = TrainStream(rows, batch_size=96, seed=1)
    ranks = [TrainStream(rows, batch_size=32, data_parallel=3, dp_rank=r, seed=1) for r in range(3)]
    for step in (0, 7, 9, 30):
        parts = [r.batch_ids(step) for r in ranks]
        assert np.array_equal(np.concatenate(parts), single.batch_ids(step))
        if step * 96 // 900 == ((step + 1) * 96 - 1) // 900:  # within one epoch no row repeats
            assert not set(parts[0]) & set(parts[1])


def test_too_small_store_is_a_clear_error(tmp_path):
    path, _ = _store(tmp_path, n=1, shard_rows=1)
    with pytest.raises(ValueError, match="too few"):
        StoreRows(path, val_fraction=0.1, val_max_rows=10, seed=0)


def test_truncated_shard_is_a_clear_error(tmp_path):
    path, _ = _store(tmp_path, n=300)
    shard = path / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ValueError, match="shard-000001"):
        StoreRows(path, val_fraction=0.1, val_max_rows=10, seed=0)


def test_prefetcher_returns_items_in_order_and_raises_worker_errors():
    calls = []

    def items():
        for step in range(1, 6):
            calls.append(step)
            if step == 4:
                raise RuntimeError("boom at 4")
            yield torch.full((2,), step)

    for depth in (0, 2):
        calls.clear()
        with Prefetcher(items(), depth=depth) as p:
            assert [int(next(p)[0]) for _ in range(3)] == [1, 2, 3]
            with pytest.raises(RuntimeError, match="boom at 4"):
                next(p)
        assert calls[:4] == [1, 2, 3, 4]
    with Prefetcher(iter([1, 2]), depth=3) as p:
        assert list(p) == [1, 2]  # ends where its items end
        assert list(p) == [] and next(p, None) is None  # and stays ended (no wait on a stopped worker)

def test_a_target_store_must_hold_the_same_tokens_row_for_row(tmp_path):
    from capture.store import ActivationStore, write_shard
    from training.synthetic import write_store

    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    a = write_store(tmp_path / "L1MI", x, shard_rows=100, site="L1MI", stats=False)
    b = write_store(tmp_path / "L1M", x * 2, shard_rows=100, site="L1M", stats=False)
    ActivationStore(a).check_same_rows(ActivationStore(b))  # the same rows: no error
    c = write_store(tmp_path / "other", x, shard_rows=150, site="L1M", stats=False)
    with pytest.raises(ValueError, match="does not hold the rows"):
        ActivationStore(a).check_same_rows(ActivationStore(c))
    # Same shard sizes, other tokens in shard 1 (the manifest is not consulted for the columns).
    write_shard(b / "shard-000001.safetensors", x[100:200] * 2, torch.ones(100, dtype=torch.int32),
                torch.full((100,), 1, dtype=torch.int64), torch.arange(100, dtype=torch.int32), site="L1M")
    with pytest.raises(ValueError, match="holds other tokens"):
        ActivationStore(a).check_same_rows(ActivationStore(b))
