"""The activation store: reader, atomic shard/manifest writes, and the capture's writer process.

A store is a directory with ``manifest.json`` and shards ``shard-NNNNNN.safetensors``. Each shard holds
``activations`` [N, d] (bf16/fp16/fp32) and the int tensors ``tokens`` (int32), ``doc_ids`` (int64) and
``positions`` (int32), all [N]; row i of each belongs together. Every file is written under a temporary
name, flushed to disk and renamed, so a killed job leaves either the old file or the new one, never
half of one. The manifest lists each shard with its row count and sha256.

``writer_main`` runs in a separate process during a capture: it receives row batches from the forward
loop through a bounded queue, orders each read-ahead window's rows by (doc_id, position), closes a
shard when enough rows have gathered, and commits the rank's progress only after the shard is on disk.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import queue
import struct
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from llama3_sae.files import HashIndex, atomic_path, atomic_write_json, fsync_dir, sha256_file
from llama3_sae.tensorfile import save_safetensors
from safetensors.torch import load as st_load

FORMAT = "llama3-sae-activations"
VERSION = 1
MANIFEST = "manifest.json"
STATS_FILE = "stats.safetensors"
COLUMNS = ("activations", "tokens", "doc_ids", "positions")
INT_DTYPES = {"tokens": torch.int32, "doc_ids": torch.int64, "positions": torch.int32}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_DTYPE_ALIASES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                  "float32": torch.float32, "fp32": torch.float32}


VERIFIED_FILE = "verified.json"  # shard hashes checked so far, by size and modification time


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"unknown activation dtype {name!r}; expected one of {sorted(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[name]


# --------------------------------------------------------------------------- atomic files
def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically; return its sha256."""
    with atomic_path(path, fsync=False) as tmp:
        # A fixed header order: identical shards have identical bytes and sha256, so stores compare by hash.
        save_safetensors(tensors, tmp, metadata, fsync=False)
        digest = sha256_file(tmp, fsync=True)  # one read both hashes and flushes it
    fsync_dir(Path(path).parent)
    return digest


def write_shard(path: Path, activations: torch.Tensor, tokens: torch.Tensor, doc_ids: torch.Tensor,
                positions: torch.Tensor, *, site: str = "") -> dict[str, Any]:
    """Write one shard atomically; return its manifest entry ``{"file", "rows", "sha256"}``."""
    n = activations.shape[0]
    assert activations.dim() == 2 and tokens.shape == doc_ids.shape == positions.shape == (n,), (
        activations.shape, tokens.shape, doc_ids.shape, positions.shape)
    tensors = {"activations": activations, "tokens": tokens.to(INT_DTYPES["tokens"]),
               "doc_ids": doc_ids.to(INT_DTYPES["doc_ids"]), "positions": positions.to(INT_DTYPES["positions"])}
    digest = write_tensors(Path(path), tensors, metadata={"format": FORMAT, "site": site})
    return {"file": Path(path).name, "rows": int(n), "sha256": digest}


def read_tensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file whole; with ``sha256`` check the bytes first (one read for both)."""
    data = Path(path).read_bytes()
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise ValueError(f"{path}: sha256 {got[:12]}... does not match the manifest's {sha256[:12]}...; "
                             "the file is corrupt or was changed after writing. Re-run the step that wrote it.")
    return st_load(data)


# --------------------------------------------------------------------------- reader
class ActivationStore:
    """Read a store directory: ``store.read_shard(i)`` -> {"activations", "tokens", "doc_ids", "positions"}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)

    @property
    def site(self) -> str:
        return self.manifest["site"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.manifest["dtype"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def num_rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    def __len__(self) -> int:
        return self.num_rows

    def shard_path(self, i: int) -> Path:
        return self.path / self.shards[i]["file"]

    def read_shard(self, i: int, *, verify: bool = False) -> dict[str, torch.Tensor]:
        entry = self.shards[i]
        out = read_tensors(self.shard_path(i), entry["sha256"] if verify else None)
        missing = [c for c in COLUMNS if c not in out]
        if missing:
            raise ValueError(f"{self.shard_path(i)}: missing tensors {missing}; not a {FORMAT} shard")
        if out["activations"].shape != (entry["rows"], self.d_model):
            raise ValueError(f"{self.shard_path(i)}: activations have shape {tuple(out['activations'].shape)}, "
                             f"the manifest says ({entry['rows']}, {self.d_model})")
        return out

    def iter_shards(self, *, verify: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self.shards)):
            yield self.read_shard(i, verify=verify)

    def read_all(self, *, verify: bool = False) -> dict[str, torch.Tensor]:
        """Every row in memory (small stores and tests)."""
        parts = list(self.iter_shards(verify=verify))
        if not parts:
            return {"activations": torch.empty(0, self.d_model, dtype=self.dtype),
                    **{k: torch.empty(0, dtype=v) for k, v in INT_DTYPES.items()}}
        return {k: torch.cat([p[k] for p in parts]) for k in COLUMNS}

    def stats(self) -> dict[str, torch.Tensor] | None:
        """The per-dimension statistics written by ``llama3-sae preprocess`` (float64), or None."""
        entry = self.manifest.get("stats")
        if entry is None:
            return None
        return read_tensors(self.path / entry["file"], entry.get("sha256"))

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest; raises ValueError naming the first bad (or
        truncated) shard. Hashes are remembered in ``verified.json`` by size and modification time, so an
        unchanged shard is read once, not at every training run."""
        index = HashIndex(self.path / VERIFIED_FILE)
        try:
            for i, entry in enumerate(self.shards):
                path = self.shard_path(i)
                declared = declared_size(path)
                if declared is not None and path.stat().st_size < declared:
                    raise ValueError(f"{path} is truncated: its header needs {declared:,} bytes, the file has "
                                     f"{path.stat().st_size:,}. Re-run the capture (or preprocess) that wrote it")
                got = index.sha256(path, key=entry["file"])
                if got != entry["sha256"]:
                    raise ValueError(f"{path}: sha256 {got[:12]}... does not match the manifest's "
                                     f"{entry['sha256'][:12]}...: the shard is corrupt (flipped bytes or an incomplete "
                                     "copy). Re-run the capture (or preprocess) that wrote it")
        finally:
            index.save()


def declared_size(path: Path) -> int | None:
    """The size a safetensors file's header says it has, or None when the header cannot be read."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        return 8 + header_len + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                                    default=0)
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        partial = (path / ".parts").is_dir() or (path.parent / ".capture").is_dir()
        hint = (" A capture into it has not finished: re-run the same capture command to resume it."
                if partial else " Pass the directory of one site, e.g. OUT/L8R, written by `llama3-sae capture`.")
        raise ValueError(f"{path} is not an activation store (no {MANIFEST}).{hint}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath} is not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{mpath}: version {manifest.get('version')!r} is not supported (this code reads {VERSION})")
    for key in ("d_model", "dtype", "site", "shards"):
        if key not in manifest:
            raise ValueError(f"{mpath}: missing key {key!r}")
    return manifest


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(path) / MANIFEST, manifest)


# --------------------------------------------------------------------------- locking
class FileLock:
    """An advisory ``flock`` on a file: exclusive to check that no earlier process still writes, shared
    while this run's processes (main and writer) work. Released by the kernel when a process dies."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, *, exclusive: bool, timeout: float, what: str = "") -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise ValueError(f"{self.path} is locked: another process is still writing {what or 'here'}. "
                                 "Wait for it to finish or stop it, then run the command again.")
            time.sleep(0.05)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- writer process
@dataclass
class WriterSpec:
    """Everything the writer process needs (picklable: it crosses a spawn)."""

    sites: list[str]
    part_dirs: dict[str, str]
    """site -> directory of this rank's shards."""
    progress_path: str
    lock_path: str
    shard_rows: int
    """Close a shard at the end of the first window that brings it to this many rows."""
    progress: dict[str, Any]
    """The committed progress to continue from."""
    parent_pid: int


@dataclass
class _Pending:
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    meta: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    rows: int = 0


def new_progress(rank: int, world: int, sites: list[str]) -> dict[str, Any]:
    """A rank's progress record before anything is committed (what ``_Writer.flush`` updates)."""
    return {"rank": rank, "world": world, "docs_done": 0, "finished": False, "shards": {s: [] for s in sites},
            "counters": {}}


class _Writer:
    def __init__(self, spec: WriterSpec):
        self.spec = spec
        self.progress = spec.progress
        self.window = _Pending({s: [] for s in spec.sites})
        self.shard = _Pending({s: [] for s in spec.sites})
        self.docs_pending = 0
        self.counters_pending: dict[str, int] = {}

    def add(self, acts: dict[str, torch.Tensor], tokens: torch.Tensor, doc_ids: torch.Tensor,
            positions: torch.Tensor) -> None:
        # Copies, so the shared-memory blocks (one file descriptor each) are released right away.
        for s in self.spec.sites:
            self.window.acts[s].append(acts[s].clone())
        self.window.meta.append((tokens.clone(), doc_ids.clone(), positions.clone()))
        self.window.rows += tokens.shape[0]

    def end_window(self, counters: dict[str, int]) -> None:
        # Batches were cut by length; restore document order so shards do not depend on batching.
        if self.window.rows:
            tokens, doc_ids, positions = (torch.cat(c) for c in zip(*self.window.meta))
            order = torch.argsort(doc_ids, stable=True)
            self.shard.meta.append((tokens[order], doc_ids[order], positions[order]))
            for s in self.spec.sites:
                self.shard.acts[s].append(torch.cat(self.window.acts[s])[order])
            self.shard.rows += self.window.rows
        self.window = _Pending({s: [] for s in self.spec.sites})
        self.docs_pending += int(counters["docs"])
        for k, v in counters.items():
            self.counters_pending[k] = self.counters_pending.get(k, 0) + int(v)
        if self.shard.rows >= self.spec.shard_rows:
            self.flush()

    def flush(self, *, finished: bool = False) -> None:
        if self.shard.rows:
            tokens, doc_ids, positions = (torch.cat(c) for c in zip(*self.shard.meta))
            for s in self.spec.sites:
                entries = self.progress["shards"][s]
                path = Path(self.spec.part_dirs[s]) / shard_name(len(entries))
                entry = write_shard(path, torch.cat(self.shard.acts[s]), tokens, doc_ids, positions, site=s)
                entry["doc_range"] = [int(doc_ids[0]), int(doc_ids[-1])]
                entries.append(entry)
        # The progress file is the commit point: only shards listed in it count on resume.
        self.progress["docs_done"] += self.docs_pending
        counters = self.progress["counters"]
        for k, v in self.counters_pending.items():
            counters[k] = counters.get(k, 0) + v
        self.progress["finished"] = finished
        atomic_write_json(Path(self.spec.progress_path), self.progress)
        self.shard = _Pending({s: [] for s in self.spec.sites})
        self.docs_pending = 0
        self.counters_pending = {}


def writer_main(spec: WriterSpec, q: Any, results: Any) -> None:
    """Entry point of the writer process. Messages: ("rows", acts, tokens, doc_ids, positions),
    ("window", counters), ("finish",). Replies ("done", progress) or ("error", traceback)."""
    torch.set_num_threads(1)
    lock = FileLock(Path(spec.lock_path))
    try:
        lock.acquire(exclusive=False, timeout=60, what="this rank's capture")
        writer = _Writer(spec)
        while True:
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != spec.parent_pid:
                    return  # the capture was killed; what is committed stays, the rest is redone on resume
                continue
            kind = msg[0]
            if kind == "rows":
                writer.add(*msg[1:])
            elif kind == "window":
                writer.end_window(msg[1])
            elif kind == "finish":
                writer.flush(finished=True)
                results.put(("done", writer.progress))
                return
            else:
                raise AssertionError(f"unknown writer message {kind!r}")
    except OSError as e:  # a full disk or a forbidden output: the user's to fix, told in one line
        results.put(("oserror", (e.errno, e.strerror or str(e), e.filename)))
        return  # no traceback: the capture prints this as one line
    except BaseException:
        results.put(("error", traceback.format_exc()))
        raise
    finally:
        lock.release()
