"""The activation store: reader, atomic shard/manifest writes, the lock a capture rank holds.

A store is a directory with ``manifest.json`` and shards ``shard-NNNNNN.safetensors``. Each shard holds
``activations`` [N, d] (bf16/fp16/fp32) and the int tensors ``tokens`` (int32), ``doc_ids`` (int64) and
``positions`` (int32), all [N]; row i of each belongs together. Every file is written under a temporary
name, flushed to disk and renamed, so a killed job leaves either the old file or the new one, never
half of one. The manifest (``capture.records.Manifest``) lists each shard with its row count and sha256.

The capture's writer process, which fills a store, is ``capture.writer``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import Iterator

import torch

from llama3_sae.devices import dtype_of
from llama3_sae.files import HashIndex, atomic_path, fsync_dir, sha256_file
from llama3_sae.tensorfile import HEADER_ERRORS, read_header, save_safetensors
from safetensors import safe_open
from safetensors.torch import load as st_load

from .records import FORMAT, MANIFEST, VERSION, Manifest, ShardEntry

__all__ = ["FORMAT", "MANIFEST", "VERSION", "Manifest", "ShardEntry"]  # the records, where store users look

STATS_FILE = "stats.safetensors"
COLUMNS = ("activations", "tokens", "doc_ids", "positions")
INT_DTYPES = {"tokens": torch.int32, "doc_ids": torch.int64, "positions": torch.int32}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


VERIFIED_FILE = "verified.json"  # shard hashes checked so far, by size and modification time


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def parse_dtype(name: str) -> torch.dtype:
    """An activation dtype named in a manifest (bfloat16 / bf16 / ...)."""
    try:
        return dtype_of(name)
    except ValueError as e:
        raise ValueError(f"unknown activation dtype: {e}") from None


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
                positions: torch.Tensor, *, site: str = "") -> ShardEntry:
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
        self.manifest = Manifest.read(self.path)

    @property
    def site(self) -> str:
        return self.manifest.site

    @property
    def d_model(self) -> int:
        return int(self.manifest.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.manifest.dtype)

    @property
    def shards(self) -> list[ShardEntry]:
        return self.manifest.shards

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
        entry = self.manifest.stats
        if entry is None:
            return None
        return read_tensors(self.path / entry["file"], entry.get("sha256"))

    def check_same_rows(self, other: "ActivationStore") -> None:
        """Row i of both stores must be the same token (a transcoder's MLP input and output): the same shard
        sizes, tokens, documents and positions; a ValueError otherwise."""
        fix = "capture both sites in one run (--sites L{L}TC) and preprocess both with the same --seed"
        if [s["rows"] for s in other.shards] != [s["rows"] for s in self.shards]:
            raise ValueError(f"{other.path} does not hold the rows of {self.path} ({other.num_rows:,} rows in "
                             f"{len(other.shards)} shards vs {self.num_rows:,} in {len(self.shards)}); {fix}")
        for s in range(len(self.shards)):
            cols = []
            for store in (self, other):
                with safe_open(str(store.shard_path(s)), framework="pt") as f:
                    cols.append([f.get_tensor(c) for c in ("tokens", "doc_ids", "positions")])
            if not all(torch.equal(a, b) for a, b in zip(*cols)):
                raise ValueError(f"{other.shard_path(s)} holds other tokens than {self.shard_path(s)}: the stores' "
                                 f"rows do not line up; {fix}")

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
        header_len, header = read_header(path)
        return 8 + header_len + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                                    default=0)
    except (*HEADER_ERRORS, KeyError, TypeError):
        return None


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
