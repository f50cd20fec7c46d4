"""The capture loop: text -> model -> one activation store per hook site, on one process or under torchrun.

Per rank: the documents whose global index is ``rank`` mod ``world`` are read in windows of about
``bucket_tokens`` tokens (tokenised in a background thread), each window is cut into length-sorted
batches, the forward stops after the deepest site, the stored rows go to a writer process through a
bounded queue, and the writer commits shards plus this rank's progress (documents done) atomically.

The run state in OUT (what a resumed run must match, each rank's commit point, the finalisation into
stores) is ``capture.runstate``'s. Re-running a finished capture does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama3_sae.dist import DistContext, setup_distributed
from llama3_sae.errors import RankZeroDecision
from llama3_sae.prefetch import Prefetcher
from llama3.chat_template import chat_format_for
from llama3.checkpoint import check_vocab, load_model, load_tokenizer, read_model_args, resolve_checkpoint
from llama3.model import Transformer, site_name

from .batching import EncodedDoc, collate, encode_window, plan_batches
from .config import DTYPES, CaptureConfig
from .sources import SourceStats, count_records, iter_documents, rank_documents, resolve_files, skip_documents
from .records import FORMAT, MANIFEST, Manifest, Progress
from .store import FileLock
from .runstate import decide, describe_model, finalize, part_dir, progress_path, remove_uncommitted, state_dir
from .writer import Outbox, WindowEnd, WriterHandle, WriterSpec

LOCK_TIMEOUT_S = 120.0


@dataclass
class CaptureSummary:
    """What a capture did (this process's view; rank 0's includes the totals of all ranks)."""

    stores: list[Path]
    rows: int = 0
    """Rows stored per site over all ranks (rank 0) or this rank."""
    docs: int = 0
    tokens: int = 0
    bytes: int = 0
    """Bytes of the shards of all sites."""
    seconds: float = 0.0
    tokens_this_run: int = 0
    """Tokens this process computed in this run (resumed work excluded)."""
    counters: dict[str, int] = field(default_factory=dict)
    source: str = ""
    """Skipped/repaired input counts."""
    status: str = "captured"
    """captured, resumed, or already complete."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- windows
@dataclass
class _Window:
    docs: list[EncodedDoc]
    counters: dict[str, int]


def _windows(cfg: CaptureConfig, docs: Iterator[Any], skip: int, tokenizer: Any, chat_format: Any) -> Iterator[_Window]:
    """Skip the ``skip`` documents already committed, then yield windows of about ``bucket_tokens``.
    Window boundaries depend only on the documents from the previous boundary on, so a resumed run
    (which starts at a committed boundary) cuts the same windows as an uninterrupted one."""
    docs = skip_documents(docs, skip, "Delete OUT to start over.")
    window = _Window([], {"docs": 0})
    n_tokens = 0
    for doc in docs:
        encoded = encode_window([doc], tokenizer, chat_format, bos=cfg.bos, max_tokens=cfg.max_tokens,
                                counters=window.counters)
        window.docs += encoded
        window.counters["docs"] += 1
        n_tokens += sum(len(e.ids) for e in encoded)
        if n_tokens >= cfg.bucket_tokens:
            yield window
            window, n_tokens = _Window([], {"docs": 0}), 0
    if window.counters["docs"]:
        yield window


def _refuse_nesting(out: Path) -> None:
    """--out must not be (inside) an activation store: OUT/<site>/ would become a store within a store."""
    for d in [out, *out.resolve().parents]:
        manifest = d / MANIFEST
        if manifest.is_file():
            try:
                fmt = json.loads(manifest.read_text()).get("format")
            except (OSError, ValueError, AttributeError):
                continue
            if fmt == FORMAT:
                raise ValueError(f"--out {out} is inside the activation store {d} (it has a {MANIFEST}); capture writes "
                                 f"one store per site under --out, so choose a folder outside it (e.g. {d.parent})")


# --------------------------------------------------------------------------- the loop
def run_capture(cfg: CaptureConfig, *, model: Transformer | None = None, tokenizer: Any = None,
                console: Any = None) -> CaptureSummary:
    """Capture ``cfg.sites`` over ``cfg.data`` into ``cfg.out``; resumes what a killed run left.

    Under torchrun (or an initialised process group) each rank captures its share. ``model`` and
    ``tokenizer`` may be given instead of loading ``cfg.ckpt_dir`` (a given model keeps its device and
    dtype; its hooks are replaced by the capture sites).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    sites = [site_name(s) for s in cfg.site_list]
    _refuse_nesting(Path(cfg.out))
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(cfg.ckpt_dir, tokenizer)
    if cfg.ckpt_dir is None or cfg.bos is None:  # the built-in model; the model's own BOS rule
        ckpt = resolve_checkpoint(cfg.ckpt_dir)
        if tokenizer is None:
            tokenizer = load_tokenizer(ckpt, cfg.tokenizer)
        cfg = dataclasses.replace(cfg, ckpt_dir=ckpt, bos=bool(tokenizer.add_bos) if cfg.bos is None else cfg.bos)
    params = model.params if model is not None else read_model_args(cfg.ckpt_dir)
    for s in cfg.site_list:
        if s.layer >= params.n_layers:
            raise ValueError(f"hook site {site_name(s)} is past the last layer of {cfg.ckpt_dir} "
                             f"(layers 0..{params.n_layers - 1})")
    dist_info = setup_distributed(cfg.device, timeout_min=cfg.dist_timeout_min, mesh=False)
    device = dist_info.device
    rank, world = dist_info.rank, dist_info.world
    try:
        decision: tuple[str, str] | None = None
        if rank == 0:
            try:
                decision = decide(cfg, sites, world)
            except ValueError as e:  # every rank must hear of it, or the others would wait forever
                decision = ("error", str(e))
        decision = dist_info.broadcast_object(decision)
        assert decision is not None
        if decision[0] == "error":
            raise RankZeroDecision(decision[1])
        if decision[0] == "complete":
            summary = _summary_from_manifests(cfg, sites)
            summary.status = "already complete"
            return summary
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.ckpt_dir, cfg.tokenizer)
        local = CaptureSummary(stores=[cfg.out / s for s in sites], status="resumed")  # "finalize": only that left
        if decision[0] == "capture":
            local = _capture_rank(cfg, sites, dist_info, device, model, tokenizer, console)
        dist_info.barrier()
        if rank == 0:
            finalize(cfg, sites, world, describe_model(cfg, params, tokenizer))
        dist_info.barrier()
        # Throughput of this run over all ranks: their tokens over the slowest rank's time.
        work = dist_info.gather_object((local.tokens_this_run, local.seconds))
        if rank != 0:
            return local
        summary = _summary_from_manifests(cfg, sites)
        summary.tokens_this_run = sum(t for t, _ in work)
        summary.seconds = max(sec for _, sec in work)
        summary.source = local.source
        summary.status = local.status
        return summary
    finally:
        # No barrier: after a failure the other ranks may never reach one.
        dist_info.close(barrier=False)


def _capture_rank(cfg: CaptureConfig, sites: list[str], d: DistContext, device: torch.device, model: Transformer | None,
                  tokenizer: Any, console: Any) -> CaptureSummary:
    rank, world = d.rank, d.world
    state = state_dir(cfg)
    state.mkdir(parents=True, exist_ok=True)
    lock = FileLock(state / f"lock-r{rank}of{world}")
    # Exclusive first: a writer of a killed earlier attempt may still be finishing a shard.
    lock.acquire(exclusive=True, timeout=LOCK_TIMEOUT_S, what=f"rank {rank}'s part of {cfg.out}")
    try:
        ppath = progress_path(cfg, rank, world)
        progress = Progress.read(ppath) if ppath.is_file() else Progress.new(rank, world, sites)
        for s in sites:
            part = part_dir(cfg, s, rank, world)
            part.mkdir(parents=True, exist_ok=True)
            remove_uncommitted(part, progress.shards[s])
        if progress.finished:
            return CaptureSummary(stores=[cfg.out / s for s in sites], status="resumed")
        lock.acquire(exclusive=False, timeout=LOCK_TIMEOUT_S)  # let our writer in, keep others out

        params = model.params if model is not None else read_model_args(cfg.ckpt_dir)
        store_dtype = DTYPES[cfg.dtype]
        spec = WriterSpec(
            sites=sites,
            part_dirs={s: str(part_dir(cfg, s, rank, world)) for s in sites},
            progress_path=str(ppath),
            lock_path=str(lock.path),
            shard_rows=max(1, int(cfg.shard_mb * 2**20 / (params.dim * store_dtype.itemsize))),
            progress=progress,
            parent_pid=os.getpid(),
        )
        # Start the writer first: its start-up (a fresh interpreter importing torch) overlaps the model load.
        writer = WriterHandle(spec, cfg.queue_batches)
        try:
            if model is None:
                model = load_model(cfg.ckpt_dir, device=device, dtype=DTYPES[cfg.model_dtype],
                                   store_layer_activ=sites, max_seq_len=cfg.max_tokens)
            else:
                model.set_hooks(store_layer_activ=sites)
            return _run_loop(cfg, sites, d, model.eval(), tokenizer, chat_format_for(tokenizer), progress, writer,
                             console)
        except BaseException:
            writer.kill()
            raise
    finally:
        lock.release()


def _run_loop(cfg: CaptureConfig, sites: list[str], d: DistContext, model: Transformer, tokenizer: Any, chat_format: Any,
              progress: Progress, writer: WriterHandle, console: Any) -> CaptureSummary:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    rank, world = d.rank, d.world
    if cfg.max_tokens > model.max_seq_len:
        raise ValueError(f"--max-tokens {cfg.max_tokens} exceeds the model's max_seq_len {model.max_seq_len}")
    check_vocab(model.params, tokenizer.n_words, where=cfg.ckpt_dir, exact=None, tokenizer=tokenizer)
    device = model.tok_embeddings.weight.device
    store_dtype = DTYPES[cfg.dtype]
    files = resolve_files(cfg.data, cfg.format)
    source_stats = SourceStats()
    skip = progress.docs_done
    docs = rank_documents(iter_documents(cfg, source_stats, files), rank, world)
    windows = Prefetcher(_windows(cfg, docs, skip, tokenizer, chat_format), 2, name="capture-prefetch")
    bar = Progress(TextColumn(f"capture {','.join(sites)}" + (f" rank {rank}/{world}" if world > 1 else "")),
                   BarColumn(), MofNCompleteColumn(), TextColumn("docs"), TextColumn("{task.fields[tps]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                   disable=not cfg.progress or rank != 0)
    summary = CaptureSummary(stores=[cfg.out / s for s in sites], status="resumed" if skip else "captured")
    outbox = Outbox(writer, sites, store_dtype)
    t0 = time.perf_counter()
    with windows, bar, torch.inference_mode():
        task = bar.add_task("capture", total=_rank_share(cfg.limit, rank, world), completed=skip, tps="")
        if not cfg.split_sentences and cfg.progress and rank == 0:
            # Counting the records of big text files takes a while: do it beside the capture, for the ETA.
            threading.Thread(target=_count_for_eta, args=(bar, task, files, cfg.limit, rank, world), daemon=True,
                             name="capture-count").start()
        for window in windows:
            counters = dict(window.counters)
            counters.update(rows=0, tokens=0, padded=0, bos_rows_left_out=0)
            if window.docs:
                lengths = [len(doc.ids) for doc in window.docs]
                for idx in plan_batches(lengths, cfg.tokens_per_batch, cfg.max_padding):
                    batch_docs = [window.docs[i] for i in idx]
                    skip_first = [not cfg.store_first_token] * len(batch_docs)
                    batch = collate(batch_docs, pad_id=0, skip_first=skip_first)
                    acts = model.forward_activations(batch.tokens.to(device, non_blocking=True))
                    outbox.send(acts, batch)
                    counters["rows"] += int(batch.row_tokens.shape[0])
                    counters["tokens"] += batch.real_tokens
                    counters["padded"] += batch.padded_tokens
                    counters["bos_rows_left_out"] += sum(skip_first)
                    summary.tokens_this_run += batch.real_tokens
                    elapsed = time.perf_counter() - t0
                    bar.update(task, tps=f"{summary.tokens_this_run / max(elapsed, 1e-9):,.0f} tok/s")
            outbox.flush()
            writer.put(WindowEnd(counters))
            writer.check()
            bar.update(task, advance=counters["docs"])
        progress = writer.finish()
    summary.seconds = time.perf_counter() - t0
    summary.counters = dict(progress.counters)
    summary.rows = summary.counters.get("rows", 0)
    summary.docs = summary.counters.get("docs", 0)
    summary.tokens = summary.counters.get("tokens", 0)
    summary.source = source_stats.problems()
    return summary


def _rank_share(total: int | None, rank: int, world: int) -> int | None:
    return None if total is None else (total - rank + world - 1) // world


def _count_for_eta(bar: Any, task: Any, files: list, limit: int | None, rank: int, world: int) -> None:
    n = count_records(files)
    if n is not None:
        bar.update(task, total=_rank_share(n if limit is None else min(n, limit), rank, world))


# --------------------------------------------------------------------------- finalize
def _summary_from_manifests(cfg: CaptureConfig, sites: list[str]) -> CaptureSummary:
    summary = CaptureSummary(stores=[cfg.out / s for s in sites])
    for i, s in enumerate(sites):
        m = Manifest.read(cfg.out / s)
        summary.bytes += sum((cfg.out / s / e["file"]).stat().st_size for e in m.shards)
        if i == 0:
            summary.rows, summary.docs, summary.tokens = m.num_rows, m.num_docs, m.num_tokens
            summary.counters = dict(m.counters)
    return summary


def format_summary(summary: CaptureSummary) -> str:
    c = summary.counters
    lines = [f"capture {summary.status}: {summary.rows:,} rows per site from {summary.docs:,} documents "
             f"({summary.tokens:,} tokens), {summary.bytes / 2**20:,.1f} MiB in {len(summary.stores)} store(s)"]
    if summary.tokens_this_run:
        lines.append(f"  {summary.tokens_this_run:,} tokens this run in {summary.seconds:,.1f} s: "
                     f"{summary.tokens_per_s:,.0f} tokens/s")
    if c.get("padded"):
        lines.append(f"  padding computed: {1 - c.get('tokens', 0) / c['padded']:.1%} of the batch positions")
    if c.get("truncated_docs"):
        lines.append(f"  cut to --max-tokens: {c['truncated_docs']:,} documents lost {c['truncated_tokens']:,} tokens")
    if c.get("bos_rows_left_out"):
        lines.append(f"  first-token rows not stored (attention sinks): {c['bos_rows_left_out']:,} "
                     "(--store-first-token keeps them)")
    if c.get("empty_docs"):
        lines.append(f"  documents without tokens skipped: {c['empty_docs']:,}")
    if summary.source:
        lines.append(f"  input: {summary.source}")
    lines += [f"  store: {p}" for p in summary.stores]
    lines.append("next: statistics and a shuffled copy for training, per store: "
                 + "; ".join(f"llama3-sae preprocess --store {p}" for p in summary.stores))
    return "\n".join(lines)
