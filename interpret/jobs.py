"""What every LLM command (interpret, score) sets up the same way: the --sync limit, the client, the job
runner over the Message Batches API, the cost estimate and confirmation, and the closing summary."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from .batch_client import JobRunner, RunnerOptions, RunSummary, make_client
from .requests import Request
from .cost import Estimate, estimate
from .config import LLMJobConfig


class LLMJob:
    """One labelling or scoring job: ``run`` its requests (synchronously with --sync, else as batches, each
    after the estimate is confirmed), then ``ok_records`` to merge and ``finish`` to report."""

    def __init__(self, cfg: LLMJobConfig, kind: str, what: str, n_requests: int, console: Console,
                 client: Any = None):
        check_sync_limit(cfg, n_requests)
        self.cfg, self.what, self.console = cfg, what, console
        self.client = client if client is not None else make_client(max_retries=cfg.max_retries, timeout_s=cfg.timeout_s,
                                                                           kind=kind)
        self.runner = JobRunner(self.client, cfg.workdir, kind, runner_options(cfg), console=console, redo=cfg.redo)
        self.confirm = make_confirm(console, cfg, self.client, what, lambda p: len(self.runner.chunks(p)))

    def run(self, requests: list[Request], handle: Callable) -> RunSummary:
        run = self.runner.run_sync if self.cfg.sync else self.runner.run_batches
        return run(requests, handle, self.confirm)

    def ok_records(self) -> list[dict[str, Any]]:
        """The newest ok record of every request this job generation has answered (also earlier runs')."""
        hist = self.runner.results.history(self.runner.generation)
        return [recs[-1] for recs in hist.values() if recs and recs[-1].get("status") == "ok"]

    def finish(self, summary: RunSummary, requests: list[Request]) -> list[dict[str, Any]]:
        """Print the run's summary and the requests that ended failed; returns those."""
        failures = [s.last for s in self.runner.statuses([r.custom_id for r in requests]).values() if s.failed]
        print_summary(self.console, summary, self.what, failures, self.runner.results.path)
        return failures


def show_estimate(console: Console, est: Estimate, *, what: str, mode: str, n_batches: int | None) -> None:
    table = Table(title=f"{what}: about to send", show_header=False)
    table.add_row("requests", f"{est.n_requests:,}" + (f" in {n_batches} batch(es)" if n_batches else ""))
    table.add_row("mode", mode)
    table.add_row("input tokens", f"{est.input_tokens:,} ({est.input_method})")
    table.add_row("output tokens", f"≈{est.output_tokens_expected:,} expected, at most {est.output_tokens_max:,}")
    cost_exp, cost_max = est.cost(est.output_tokens_expected), est.cost(est.output_tokens_max)
    if cost_exp is None:
        table.add_row("cost", est.price_note)
    else:
        table.add_row("cost", f"≈${cost_exp:,.2f} expected, at most ${cost_max:,.2f} ({est.price_note})")
    console.print(table)


def make_confirm(console: Console, cfg: LLMJobConfig, client: Any, what: str,
                 n_batches_of: Callable[[list[Request]], int]) -> Callable[[list[Request]], bool]:
    """The confirmation step: estimate, table, then --yes, a y/N question, or (no terminal) a clear refusal."""
    def confirm(pending: list[Request]) -> bool:
        est = estimate(client, pending, model=cfg.model, batch=not cfg.sync, sample=cfg.count_tokens_sample,
                       expected_output_tokens=cfg.expected_output_tokens, price_in=cfg.price_input_per_mtok,
                       price_out=cfg.price_output_per_mtok)
        mode = "synchronous messages.create (full price)" if cfg.sync else "Message Batches (50% price, up to 24 h)"
        show_estimate(console, est, what=what, mode=mode, n_batches=None if cfg.sync else n_batches_of(pending))
        if cfg.yes:
            return True
        if not sys.stdin.isatty():
            raise SystemExit(f"not sending {len(pending)} requests: there is no terminal to confirm on; pass --yes "
                             "to send without asking")
        answer = console.input("Send? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            console.print("nothing sent")
            return False
        return True

    return confirm


def runner_options(cfg: LLMJobConfig) -> RunnerOptions:
    return RunnerOptions(max_requests_per_batch=cfg.max_requests_per_batch, max_batch_mb=cfg.max_batch_mb,
                         poll_interval_s=cfg.poll_interval_s, max_attempts=cfg.max_attempts,
                         retry_failed=cfg.retry_failed, progress=cfg.progress)


def check_sync_limit(cfg: LLMJobConfig, n: int) -> None:
    if cfg.sync and n > cfg.sync_limit:
        raise ValueError(f"--sync would send {n} requests one by one (limit {cfg.sync_limit}); use batches (drop "
                         "--sync, half the price), choose fewer --latents, or raise --sync-limit")


def print_summary(console: Console, summary: RunSummary, what: str, failures: list[dict[str, Any]],
                  results_path: Path) -> None:
    console.print(f"{what}: {summary.ok:,} ok, {summary.failed:,} failed; sent {summary.sent:,} requests in this run"
                  + (f" ({summary.batches_created} new batch(es))" if summary.batches_created else "")
                  + (f"; replies read: {summary.input_tokens:,} input / {summary.output_tokens:,} output tokens"
                     if summary.input_tokens or summary.output_tokens else ""))
    if failures:
        console.print(f"[yellow]{len(failures)} failed (details and raw replies in {results_path}; "
                      "--retry-failed sends them again):[/]")
        for r in failures[:10]:
            why = r.get("error") if isinstance(r.get("error"), str) else (r.get("error") or {}).get("type", r["status"])
            console.print(f"  latent {r['custom_id']}: {r['status']}: {why}")
        if len(failures) > 10:
            console.print(f"  ... and {len(failures) - 10} more")

