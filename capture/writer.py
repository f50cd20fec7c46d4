"""The capture's writer process: it receives row batches from the forward loop through a bounded queue,
orders each read-ahead window's rows by (doc_id, position), closes a shard when enough rows have gathered,
and commits the rank's progress only after the shard is on disk."""

from __future__ import annotations

import os
import queue
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama3_sae.files import atomic_write_json

from .store import FileLock, shard_name, write_shard


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
