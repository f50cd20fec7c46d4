"""Training rows from an activation store: memory-mapped shards, a random held-out split, a seeded
shuffle, and each rank's share of every global batch.

The training data is one endless stream of rows, epoch after epoch. Epoch ``e`` visits the shards in
a seeded random order, in windows of ``shuffle_window`` shards whose training rows are permuted
together; a store that ``llama3-sae preprocess`` already shuffled globally is thereby shuffled again
at every epoch. Global batch ``s`` is stream positions ``[s * G, (s + 1) * G)`` with ``G`` = per-rank
batch x data-parallel ranks, and data-parallel rank ``r`` takes the ``r``-th slice of it. So:

* a batch depends only on (seed, step): resuming needs nothing but the step, and a prefetching thread
  cannot change what is trained on;
* every training row is visited exactly once per epoch, and a batch that straddles two epochs takes
  the end of one and the start of the next: no row is dropped and none is doubled;
* one process with batch ``G`` sees exactly the rows that ``N`` ranks with batch ``G / N`` see together.

Validation rows are drawn at random over the whole store (not "the last files", the original project's
split) and never appear in the training stream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capture.store import ActivationStore
from llama3_sae.tensorfile import HEADER_ERRORS, read_header

# safetensors dtype name -> (numpy dtype with the same bytes, torch dtype the bytes mean)
_ST_DTYPES: dict[str, tuple[Any, torch.dtype]] = {
    "BF16": (np.uint16, torch.bfloat16),  # numpy has no bfloat16: read the bits, reinterpret in torch
    "F16": (np.float16, torch.float16),
    "F32": (np.float32, torch.float32),
}

# Tags that give each random stream of a run its own seed: the same run seed never correlates
# the held-out split with the shard order or the row order.
_VAL_STREAM, _SHARD_STREAM, _ROW_STREAM = 1, 2, 3


def mmap_safetensor(path: Path, name: str) -> tuple[np.memmap, torch.dtype]:
    """Memory-map one tensor of a safetensors file without reading it. Returns the numpy view of its
    bytes and the torch dtype they hold."""
    try:
        header_len, header = read_header(path)
    except HEADER_ERRORS as e:
        raise ValueError(f"{path}: cannot read the safetensors header ({e}); the shard is missing or corrupt. "
                         "Re-run the capture (or preprocess) that wrote it.") from e
    if name not in header:
        raise ValueError(f"{path}: no tensor named {name!r} (has {sorted(k for k in header if k != '__metadata__')})")
    info = header[name]
    if info["dtype"] not in _ST_DTYPES:
        raise ValueError(f"{path}: {name} has dtype {info['dtype']}; training reads BF16, F16 or F32 activations")
    np_dtype, torch_dtype = _ST_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(int(s) for s in info["shape"])
    if end - begin != int(np.prod(shape)) * np.dtype(np_dtype).itemsize:
        raise ValueError(f"{path}: {name} data size does not match its shape {shape}; the shard is corrupt")
    size = path.stat().st_size
    if 8 + header_len + end > size:
        raise ValueError(f"{path} is truncated: its header needs {8 + header_len + end:,} bytes, the file has {size:,}. "
                         "Re-run the capture (or preprocess) that wrote it")
    arr = np.memmap(path, dtype=np_dtype, mode="r", offset=8 + header_len + begin, shape=shape)
    return arr, torch_dtype


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class StoreRows:
    """Random access to the rows of an activation store, memory-mapped, with a held-out split.

    ``val_ids``: sorted global row ids of the held-out rows (``val_fraction`` of all rows, at most
    ``val_max_rows``, drawn without replacement with ``seed``). Row ``i`` of shard ``s`` has global id
    ``offsets[s] + i``.
    """

    def __init__(self, path: str | Path, *, val_fraction: float, val_max_rows: int, seed: int,
                 target: str | Path | None = None):
        """target: a second store holding, row for row, what to predict from this one (a transcoder's MLP
        output); it shares the held-out split, and ``pair`` reads both."""
        self.store = ActivationStore(path)
        self.path = self.store.path
        manifest = self.store.manifest
        self.d_model = self.store.d_model
        self.site: str = manifest.site
        self.model_name: str | None = manifest.model
        self.bos: bool | None = manifest.bos
        self.first_token_excluded: bool | None = manifest.first_token_excluded
        self.shuffled: bool = manifest.shuffled is not None
        rows = np.array([int(s["rows"]) for s in self.store.shards], dtype=np.int64)
        # What the store holds, not where it is: a store rewritten at the same path is different data.
        self.fingerprint: str = hashlib.sha256(json.dumps(
            [[s["file"], int(s["rows"]), s["sha256"]] for s in self.store.shards]).encode()).hexdigest()
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.num_rows = int(self.offsets[-1])
        n_val = min(val_max_rows, max(1, round(val_fraction * self.num_rows)))
        if self.num_rows < 2 or n_val >= self.num_rows:
            raise ValueError(f"{self.path}: {self.num_rows} rows are too few to hold out {n_val} for validation "
                             "and train on the rest; capture more text or lower --val-fraction")
        # Generator.choice draws a uniform subset without materialising all row ids for large stores.
        chosen = _rng(seed, _VAL_STREAM).choice(self.num_rows, size=n_val, replace=False)
        self.val_ids = np.sort(chosen).astype(np.int64)
        # Held-out rows per shard, and so the training rows per shard.
        self._val_by_shard = np.split(self.val_ids, np.searchsorted(self.val_ids, self.offsets[1:-1]))
        self.train_counts = rows - np.array([len(v) for v in self._val_by_shard], dtype=np.int64)
        self.num_train_rows = int(self.train_counts.sum())
        self._maps: dict[int, np.memmap] = {}
        self.dtype: torch.dtype | None = None
        for s in range(len(rows)):  # check every header now: a bad shard fails here, not hours into training
            if rows[s]:
                self._shard_map(s)
        self.store.verify()  # once per shard version: the hashes are recorded in the store
        self._np_dtype = next(iter(self._maps.values())).dtype
        self.target: StoreRows | None = None
        if target is not None:
            self.target = StoreRows(target, val_fraction=val_fraction, val_max_rows=val_max_rows, seed=seed)
            if self.target.d_model != self.d_model:
                raise ValueError(f"{target} holds d_model={self.target.d_model} rows, {self.path} {self.d_model}")
            self.store.check_same_rows(self.target.store)
            self.fingerprint = hashlib.sha256((self.fingerprint + self.target.fingerprint).encode()).hexdigest()

    def pair(self, ids: np.ndarray) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rows ``ids`` as float32, with the target's rows when there is a target store."""
        x = self.gather(ids).float()
        return x if self.target is None else (x, self.target.gather(ids).float())

    def _shard_map(self, s: int) -> np.memmap:
        m = self._maps.get(s)
        if m is None:
            path = self.store.shard_path(s)
            m, dtype = mmap_safetensor(path, "activations")
            expected = (int(self.store.shards[s]["rows"]), self.d_model)
            if tuple(m.shape) != expected:
                raise ValueError(f"{path}: activations have shape {tuple(m.shape)}, the manifest says {expected}")
            if self.dtype is not None and dtype != self.dtype:
                raise ValueError(f"{path}: activations are {dtype}, other shards of the store are {self.dtype}")
            self.dtype = dtype
            self._maps[s] = m
        return m

    @property
    def stats(self) -> dict[str, torch.Tensor] | None:
        """The preprocess statistics (float64 ``mean``, ``var``, ``std``, ``mean_norm``, ...), or None."""
        return self.store.stats()

    def train_rows_of_shard(self, s: int) -> np.ndarray:
        """Global ids of shard ``s``'s training rows (all its rows except the held-out ones)."""
        lo, hi = int(self.offsets[s]), int(self.offsets[s + 1])
        keep = np.ones(hi - lo, dtype=bool)
        keep[self._val_by_shard[s] - lo] = False
        return lo + np.flatnonzero(keep).astype(np.int64)

    def gather(self, ids: np.ndarray) -> torch.Tensor:
        """Rows ``ids`` (global ids, any order) as a [len(ids), d_model] tensor in the store's dtype.
        Each shard is read in increasing row order (page-cache friendly), the result keeps ``ids``' order."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.d_model), dtype=self._np_dtype)
        if len(ids):
            if ids.min() < 0 or ids.max() >= self.num_rows:
                raise IndexError(f"row ids must be in [0, {self.num_rows}), got {ids.min()}..{ids.max()}")
            order = np.argsort(ids, kind="stable")
            sorted_ids = ids[order]
            shard = np.searchsorted(self.offsets, sorted_ids, side="right") - 1
            cuts = np.flatnonzero(np.diff(shard)) + 1
            for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ids)]])):
                s = int(shard[a])
                out[order[a:b]] = self._shard_map(s)[sorted_ids[a:b] - self.offsets[s]]
        assert self.dtype is not None
        return torch.from_numpy(out).view(self.dtype)


@dataclass
class _Epoch:
    groups: list[np.ndarray]
    """Shard ids of each shuffle window, in visiting order."""
    starts: np.ndarray
    """Stream offset (within the epoch) where each window starts; one extra entry for the end."""


class TrainStream:
    """Global batches of training rows; see the module docstring for the order.

    ``batch_ids(step)`` gives this data-parallel rank's global row ids for ``step`` and ``batch(step)``
    the rows themselves (float32).
    """

    def __init__(self, rows: StoreRows, *, batch_size: int, data_parallel: int = 1, dp_rank: int = 0,
                 shuffle_window: int = 4, seed: int = 0):
        if rows.num_train_rows <= 0:
            raise ValueError(f"{rows.path}: no training rows are left after the held-out split")
        assert 0 <= dp_rank < data_parallel
        self.rows = rows
        self.batch_size = batch_size
        self.global_batch = batch_size * data_parallel
        self.dp_rank = dp_rank
        self.shuffle_window = shuffle_window
        self.seed = seed
        self.epoch_rows = rows.num_train_rows
        self._epoch_cache: tuple[int, _Epoch] | None = None
        self._window_cache: tuple[tuple[int, int], np.ndarray] | None = None

    def _epoch(self, e: int) -> _Epoch:
        if self._epoch_cache is None or self._epoch_cache[0] != e:
            n_shards = len(self.rows.train_counts)
            order = _rng(self.seed, _SHARD_STREAM, e).permutation(n_shards)
            groups = [order[i:i + self.shuffle_window] for i in range(0, n_shards, self.shuffle_window)]
            sizes = [int(self.rows.train_counts[g].sum()) for g in groups]
            self._epoch_cache = (e, _Epoch(groups, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)))
        return self._epoch_cache[1]

    def _window(self, e: int, w: int) -> np.ndarray:
        """The permuted global row ids of window ``w`` of epoch ``e``."""
        if self._window_cache is None or self._window_cache[0] != (e, w):
            shards = self._epoch(e).groups[w]
            ids = np.concatenate([self.rows.train_rows_of_shard(int(s)) for s in shards])
            self._window_cache = ((e, w), _rng(self.seed, _ROW_STREAM, e, w).permutation(ids))
        return self._window_cache[1]

    def stream_ids(self, start: int, n: int) -> np.ndarray:
        """Global row ids at stream positions ``[start, start + n)``."""
        out = []
        pos, end = start, start + n
        while pos < end:
            e, q = divmod(pos, self.epoch_rows)
            ep = self._epoch(e)
            w = int(np.searchsorted(ep.starts, q, side="right") - 1)
            window = self._window(e, w)
            a = q - int(ep.starts[w])
            take = min(end - pos, len(window) - a)
            out.append(window[a:a + take])
            pos += take
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def batch_ids(self, step: int) -> np.ndarray:
        return self.stream_ids(step * self.global_batch + self.dp_rank * self.batch_size, self.batch_size)

    def batch(self, step: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows for ``step`` (float32); with a target store, (input, target)."""
        return self.rows.pair(self.batch_ids(step))

    def epoch_of(self, step: int) -> float:
        """Epochs completed (fractional) after ``step`` optimizer steps."""
        return step * self.global_batch / self.epoch_rows


def val_batches(rows: StoreRows, batch_size: int, part: int = 0, n_parts: int = 1
                ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's share of the held-out rows, ``batch_size`` at a time (float32); with a
    target store, (input, target) pairs."""
    ids = rows.val_ids[part::n_parts]
    for i in range(0, len(ids), batch_size):
        yield rows.pair(ids[i:i + batch_size])
