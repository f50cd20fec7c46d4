"""The capture's writer process: it receives row batches from the forward loop through a bounded queue,
orders each read-ahead window's rows by (doc_id, position), closes a shard when enough rows have gathered,
and commits the rank's progress only after the shard is on disk. ``WriterHandle`` and ``Outbox`` are the
capture loop's side of the queue."""

from __future__ import annotations

import os
import queue
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .records import Progress
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
    progress: Progress
    """The committed progress to continue from."""
    parent_pid: int


# ---- the messages the capture loop sends (the writer answers ("done", Progress), ("oserror", (errno, text,
# filename)) or ("error", traceback) on its result queue)
@dataclass
class Rows:
    """Stored rows of one batch, every site: acts[site] [N, d], and per row its token, document and position."""

    acts: dict[str, torch.Tensor]
    tokens: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor


@dataclass
class WindowEnd:
    """Every row of a read-ahead window was sent; ``counters`` counts its documents, tokens and repairs."""

    counters: dict[str, int]


@dataclass
class Finish:
    """No more rows: commit what is pending, mark the rank finished, and reply."""


@dataclass
class _Pending:
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    meta: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    rows: int = 0


class _Writer:
    def __init__(self, spec: WriterSpec):
        self.spec = spec
        self.progress = spec.progress
        self.window = _Pending({s: [] for s in spec.sites})
        self.shard = _Pending({s: [] for s in spec.sites})
        self.docs_pending = 0
        self.counters_pending: dict[str, int] = {}

    def add(self, rows: Rows) -> None:
        # Copies, so the shared-memory blocks (one file descriptor each) are released right away.
        for s in self.spec.sites:
            self.window.acts[s].append(rows.acts[s].clone())
        self.window.meta.append((rows.tokens.clone(), rows.doc_ids.clone(), rows.positions.clone()))
        self.window.rows += rows.tokens.shape[0]

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
                entries = self.progress.shards[s]
                path = Path(self.spec.part_dirs[s]) / shard_name(len(entries))
                entry = write_shard(path, torch.cat(self.shard.acts[s]), tokens, doc_ids, positions, site=s)
                entry["doc_range"] = [int(doc_ids[0]), int(doc_ids[-1])]
                entries.append(entry)
        # The progress file is the commit point: only shards listed in it count on resume.
        self.progress.commit(self.docs_pending, self.counters_pending, finished=finished,
                             path=Path(self.spec.progress_path))
        self.shard = _Pending({s: [] for s in self.spec.sites})
        self.docs_pending = 0
        self.counters_pending = {}


def writer_main(spec: WriterSpec, q: Any, results: Any) -> None:
    """Entry point of the writer process: ``Rows``, ``WindowEnd`` and ``Finish`` messages from ``q``."""
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
            if isinstance(msg, Rows):
                writer.add(msg)
            elif isinstance(msg, WindowEnd):
                writer.end_window(msg.counters)
            elif isinstance(msg, Finish):
                writer.flush(finished=True)
                results.put(("done", writer.progress))
                return
            else:
                raise AssertionError(f"unknown writer message {type(msg).__name__}")
    except OSError as e:  # a full disk or a forbidden output: the user's to fix, told in one line
        results.put(("oserror", (e.errno, e.strerror or str(e), e.filename)))
        return  # no traceback: the capture prints this as one line
    except BaseException:
        results.put(("error", traceback.format_exc()))
        raise
    finally:
        lock.release()


# --------------------------------------------------------------------------- the capture's side
class WriterHandle:
    """The capture loop's handle on the writer process: a bounded queue in, results out, failures raised."""

    def __init__(self, spec: WriterSpec, depth: int):
        ctx = torch.multiprocessing.get_context("spawn")
        self.q = ctx.Queue(maxsize=depth)
        self.results = ctx.Queue()
        self.proc = ctx.Process(target=writer_main, args=(spec, self.q, self.results), daemon=True,
                                name="capture-writer")
        self.proc.start()

    def _failure(self) -> Exception:
        try:
            kind, detail = self.results.get(timeout=5)
        except queue.Empty:
            kind, detail = "error", (f"it exited with code {self.proc.exitcode} and left no message (killed, or out "
                                     "of memory?)")
        if kind == "oserror":
            return OSError(*detail)
        return RuntimeError(f"the capture's writer process failed:\n{detail}")

    def put(self, item: Rows | WindowEnd | Finish) -> None:
        while True:
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self.proc.is_alive():
                    raise self._failure() from None

    def check(self) -> None:
        if not self.proc.is_alive():
            raise self._failure()

    def finish(self) -> Progress:
        """Commit everything and wait for the writer: the rank's final progress."""
        self.put(Finish())
        while True:
            try:
                kind, detail = self.results.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.proc.is_alive():
                    raise self._failure() from None
        self.proc.join(timeout=60)
        if kind == "oserror":
            raise OSError(*detail)
        if kind != "done":
            raise RuntimeError(f"the capture's writer process failed:\n{detail}")
        return detail

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)


class Outbox:
    """Moves a batch's stored rows off the accelerator and into the writer queue. On CUDA the copy to
    pinned memory is asynchronous and the batch is handed over after the next forward was launched, so
    the device never idles on the copy; row selection uses precomputed indices (no device sync)."""

    def __init__(self, writer: WriterHandle, sites: list[str], dtype: torch.dtype):
        self.writer, self.sites, self.dtype = writer, sites, dtype
        self.pending: tuple[Any, ...] | None = None

    def send(self, acts: dict[str, torch.Tensor], batch: Any) -> None:
        some = acts[self.sites[0]]
        device = some.device
        index = batch.keep.view(-1).nonzero().squeeze(1)  # [N] flat positions of the stored rows
        rows: dict[str, torch.Tensor] = {}
        event = None
        if device.type == "cuda":
            index = index.pin_memory().to(device, non_blocking=True)
            for s in self.sites:
                picked = acts[s].reshape(-1, some.shape[-1]).index_select(0, index).to(self.dtype)
                rows[s] = torch.empty(picked.shape, dtype=self.dtype, pin_memory=True)
                rows[s].copy_(picked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            for s in self.sites:
                rows[s] = acts[s].reshape(-1, some.shape[-1]).index_select(0, index).to(self.dtype)
        self.flush()
        self.pending = (event, rows, batch.row_tokens, batch.row_doc_ids, batch.row_positions)

    def flush(self) -> None:
        if self.pending is None:
            return
        event, *message = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        self.writer.put(Rows(*message))
