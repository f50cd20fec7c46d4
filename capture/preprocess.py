"""Preprocess a store: exact per-dimension statistics and a global shuffle with bounded memory.

Statistics: each shard is reduced in float64 chunks to (count, mean, M2, sum of norms); shard results
are merged in shard order with Chan et al.'s pairwise update, so the result does not depend on how many
worker processes ran (and equals a one-pass float64 computation up to float64 rounding). They are
stored as ``stats.safetensors`` beside the shards with a ``stats`` entry in the manifest; training
initialises ``b_pre`` and its input normalisation from them.

Shuffle (two passes, no row dropped):
  1. every input shard's rows are assigned uniformly at random to one of B buckets and written
     bucket-contiguous to a scratch file (workers in parallel, reading each shard once for stats too);
  2. every bucket gathers its slice of each scratch file, permutes it uniformly and becomes one output
     shard. B is chosen so one bucket fits the memory budget.
A random bucket per row followed by a uniform permutation inside each bucket is a uniform random
permutation of all rows, and no worker ever holds more than one input shard or one bucket.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .config import PreprocessConfig
from .store import (COLUMNS, MANIFEST, STATS_FILE, ActivationStore, read_tensors, shard_name, write_shard,
                    write_tensors)


# --------------------------------------------------------------------------- statistics
@dataclass
class RunningStats:
    """Count, mean and sum of squared deviations (M2) per dimension in float64, plus norm sums."""

    count: int
    mean: torch.Tensor
    """[d] float64."""
    m2: torch.Tensor
    """[d] float64: sum over rows of (x - mean)^2."""
    norm_sum: float
    """Sum over rows of the L2 norm ||x||."""
    sq_norm_sum: float
    """Sum over rows of ||x||^2."""

    @classmethod
    def empty(cls, d: int) -> "RunningStats":
        z = torch.zeros(d, dtype=torch.float64)
        return cls(0, z, z.clone(), 0.0, 0.0)

    @classmethod
    def of(cls, x: torch.Tensor, chunk_rows: int = 1024) -> "RunningStats":
        """Statistics of the rows of x [N, d], computed in float64 chunks and merged."""
        out = cls.empty(x.shape[1])
        for start in range(0, x.shape[0], chunk_rows):
            c = x[start:start + chunk_rows].to(torch.float64)
            mean = c.mean(0)
            norms = c.norm(dim=1)
            out = out.merge(cls(c.shape[0], mean, (c - mean).pow(2).sum(0), float(norms.sum()),
                                float(norms.pow(2).sum())))
        return out

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Chan, Golub & LeVeque's pairwise update: exact for the union of both row sets."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta.pow(2) * (self.count * other.count / n)
        return RunningStats(n, mean, m2, self.norm_sum + other.norm_sum, self.sq_norm_sum + other.sq_norm_sum)

    @property
    def var(self) -> torch.Tensor:
        """Population variance M2 / count."""
        return self.m2 / max(self.count, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        n = max(self.count, 1)
        return {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "mean": self.mean,
            "var": self.var,
            "std": self.var.sqrt(),
            "m2": self.m2,
            "mean_norm": torch.tensor([self.norm_sum / n], dtype=torch.float64),
            "mean_sq_norm": torch.tensor([self.sq_norm_sum / n], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "RunningStats":
        n = int(t["count"][0])
        return cls(n, t["mean"], t["m2"], float(t["mean_norm"][0]) * n, float(t["mean_sq_norm"][0]) * n)


def merge_all(parts: Sequence[RunningStats], d: int) -> RunningStats:
    out = RunningStats.empty(d)
    for p in parts:
        out = out.merge(p)
    return out


# --------------------------------------------------------------------------- workers
def _seed(seed: int, kind: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{kind}:{index}".encode()).digest()[:8], "little") >> 1


@dataclass
class _ScatterJob:
    index: int
    path: str
    sha256: str | None
    rows: int
    scratch: str | None
    """Where the bucket-contiguous copy goes (None: statistics only)."""
    n_buckets: int
    seed: int
    chunk_rows: int


@dataclass
class _ScatterResult:
    index: int
    stats: RunningStats
    bucket_counts: list[int]


def _scatter(job: _ScatterJob) -> _ScatterResult:
    """Pass 1 for one input shard: statistics, and the rows grouped by a random bucket per row."""
    t = read_tensors(Path(job.path), job.sha256)
    acts = t["activations"]
    if acts.shape[0] != job.rows:
        raise ValueError(f"{job.path}: {acts.shape[0]} rows, the manifest says {job.rows}")
    stats = RunningStats.of(acts, job.chunk_rows)
    counts = [0] * job.n_buckets
    if job.scratch is not None:
        g = torch.Generator().manual_seed(_seed(job.seed, "bucket", job.index))
        bucket = torch.randint(job.n_buckets, (job.rows,), generator=g)
        order = torch.argsort(bucket, stable=True)
        counts = torch.bincount(bucket, minlength=job.n_buckets).tolist()
        offsets = torch.tensor([0, *counts]).cumsum(0)
        write_tensors(Path(job.scratch), {**{k: t[k][order] for k in COLUMNS}, "offsets": offsets})
    return _ScatterResult(job.index, stats, counts)


@dataclass
class _GatherJob:
    bucket: int
    scratch: list[str]
    out: str
    seed: int
    site: str


def _gather(job: _GatherJob) -> dict[str, Any]:
    """Pass 2 for one bucket: its slice of every scratch file, permuted, written as one output shard."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in COLUMNS}
    for path in job.scratch:
        with safe_open(path, framework="pt") as f:
            offsets = f.get_tensor("offsets")
            a, b = int(offsets[job.bucket]), int(offsets[job.bucket + 1])
            if a == b:
                continue
            for k in COLUMNS:
                parts[k].append(f.get_slice(k)[a:b])
    assert parts["tokens"], f"bucket {job.bucket} is empty; empty buckets get no job"
    n = sum(p.shape[0] for p in parts["tokens"])
    g = torch.Generator().manual_seed(_seed(job.seed, "permute", job.bucket))
    perm = torch.randperm(n, generator=g)
    t = {}
    for k in COLUMNS:  # one column at a time, so at most one extra copy is alive
        t[k] = torch.cat(parts.pop(k))[perm]
    return write_shard(Path(job.out), t["activations"], t["tokens"], t["doc_ids"], t["positions"], site=job.site)


def _map(fn: Callable[[Any], Any], jobs: list[Any], workers: int) -> Iterator[Any]:
    """Results in job order; a spawn pool when more than one worker."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    # One thread per pool worker, so workers do not oversubscribe the cores; set in the workers only,
    # never in the caller, whose thread count is not ours to change.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=torch.set_num_threads,
                                                   initargs=(1,)) as pool:
        yield from pool.imap(fn, jobs)


# --------------------------------------------------------------------------- the stage
@dataclass
class PreprocessSummary:
    store: Path
    rows: int
    shards_in: int
    shuffled: Path | None
    shards_out: int
    mean_norm: float
    seconds: float
    status: str = "done"


def run_preprocess(cfg: PreprocessConfig, console: Any = None) -> PreprocessSummary:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    store = ActivationStore(cfg.store)
    manifest = store.manifest
    out_dir = cfg.shuffle_out or (cfg.store / "shuffled")
    if out_dir.resolve() == cfg.store.resolve():
        raise ValueError("--shuffle-out must differ from --store")
    done_stats = manifest.stats is not None and (cfg.store / manifest.stats["file"]).is_file()
    done_shuffle = (out_dir / MANIFEST).is_file()
    if done_stats and (done_shuffle or not cfg.shuffle) and not cfg.overwrite:
        shuffled = out_dir if done_shuffle and cfg.shuffle else None
        return PreprocessSummary(cfg.store, store.num_rows, len(store.shards), shuffled,
                                 len(ActivationStore(out_dir).shards) if shuffled else 0,
                                 float(manifest.stats["mean_norm"]), 0.0, status="already done")
    if cfg.shuffle and out_dir.exists():
        foreign = [p.name for p in out_dir.iterdir() if not _ours(p.name)]
        if foreign:
            raise ValueError(f"{out_dir} holds files a shuffle did not write ({foreign[:5]}); pass another "
                             "--shuffle-out or remove them")
        if done_shuffle and not cfg.overwrite:
            raise ValueError(f"{out_dir} already holds a shuffled store; pass --overwrite to write it again")
    workers = cfg.workers or min(4, os.cpu_count() or 1)
    d = store.d_model
    row_bytes = d * store.dtype.itemsize + 16
    n_rows = store.num_rows
    n_buckets = max(1, math.ceil(n_rows * row_bytes / (cfg.memory_mb * 2**20)))
    scratch_dir = out_dir / ".tmp"
    if cfg.shuffle:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        scratch_dir.mkdir(parents=True)
    jobs = [_ScatterJob(i, str(store.shard_path(i)), e["sha256"] if cfg.verify else None, int(e["rows"]),
                        str(scratch_dir / f"scatter-{i:06d}.safetensors") if cfg.shuffle else None,
                        n_buckets, cfg.seed, cfg.chunk_rows) for i, e in enumerate(store.shards)]
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=console, disable=not cfg.progress)
    try:
        with bar:
            stats_entry, shards_out = _passes(cfg, store, jobs, out_dir, scratch_dir, n_buckets, workers, bar)
    finally:
        if scratch_dir.exists():
            shutil.rmtree(scratch_dir)
    return PreprocessSummary(cfg.store, n_rows, len(store.shards), out_dir if cfg.shuffle else None, shards_out,
                             float(stats_entry["mean_norm"]), time.perf_counter() - t0)


def _passes(cfg: PreprocessConfig, store: ActivationStore, jobs: list[_ScatterJob], out_dir: Path, scratch_dir: Path,
            n_buckets: int, workers: int, bar: Any) -> tuple[dict[str, Any], int]:
    """Pass 1 (statistics + scatter) and, when shuffling, pass 2 (gather); then the manifests."""
    manifest, n_rows = store.manifest, store.num_rows
    task = bar.add_task(f"statistics{' + scatter' if cfg.shuffle else ''} ({workers} workers)", total=len(jobs))
    results: list[_ScatterResult] = []
    for r in _map(_scatter, jobs, workers):
        results.append(r)
        bar.advance(task)
    stats = merge_all([r.stats for r in results], store.d_model)  # in shard order, whatever the workers
    assert stats.count == n_rows, (stats.count, n_rows)
    stats_entry = _write_stats(cfg.store, stats)
    new_manifest = dataclasses.replace(manifest, stats=stats_entry)
    if not cfg.shuffle:
        new_manifest.write(cfg.store)
        return stats_entry, 0

    totals = [sum(r.bucket_counts[b] for r in results) for b in range(n_buckets)]
    scratch = [j.scratch for j in jobs if j.rows and j.scratch is not None]
    gjobs = [_GatherJob(b, scratch, str(out_dir / shard_name(k)), cfg.seed, store.site)
             for k, b in enumerate(b for b in range(n_buckets) if totals[b])]
    task = bar.add_task(f"shuffle into {len(gjobs)} shards", total=len(gjobs))
    entries = []
    for e in _map(_gather, gjobs, workers):
        entries.append(e)
        bar.advance(task)
    assert sum(e["rows"] for e in entries) == n_rows, "shuffle lost or doubled rows"
    _write_stats(out_dir, stats)
    shuffled_manifest = dataclasses.replace(
        manifest, shards=entries, num_rows=n_rows, stats=stats_entry, shuffled_store=None,
        shuffled={"seed": cfg.seed, "from": os.path.relpath(cfg.store.resolve(), out_dir.resolve()),
                  "buckets": n_buckets, "created": datetime.datetime.now().isoformat(timespec="seconds")})
    shutil.rmtree(scratch_dir)
    # Source manifest first: a finished shuffled store then always comes with finished statistics.
    new_manifest.shuffled_store = os.path.relpath(out_dir.resolve(), cfg.store.resolve())
    new_manifest.write(cfg.store)
    shuffled_manifest.write(out_dir)
    return stats_entry, len(entries)


def _ours(name: str) -> bool:
    """Names a (possibly killed) shuffle writes into its output directory."""
    return (name in (".tmp", MANIFEST, STATS_FILE) or (name.startswith("shard-") and name.endswith(".safetensors"))
            or (name.startswith(".") and ".tmp-" in name))


def _write_stats(store_dir: Path, stats: RunningStats) -> dict[str, Any]:
    t = stats.tensors()
    digest = write_tensors(store_dir / STATS_FILE, t, metadata={"variance": "population (m2 / count)"})
    return {"file": STATS_FILE, "sha256": digest, "rows": stats.count, "mean_norm": float(t["mean_norm"][0]),
            "mean_sq_norm": float(t["mean_sq_norm"][0]), "dtype": "float64"}


def format_summary(s: PreprocessSummary) -> str:
    lines = [f"preprocess {s.status}: {s.rows:,} rows in {s.shards_in} shards; mean norm {s.mean_norm:.4g}"]
    lines.append(f"  statistics: {s.store / STATS_FILE}")
    if s.shuffled is not None:
        lines.append(f"  shuffled store: {s.shuffled} ({s.shards_out} shards)")
    if s.seconds:
        lines.append(f"  {s.seconds:,.1f} s")
    lines.append(f"next: llama3-sae train --store {s.shuffled if s.shuffled is not None else s.store} --out SAE_DIR "
                 "(--n-latents, --k; see llama3-sae train --help)")
    return "\n".join(lines)
