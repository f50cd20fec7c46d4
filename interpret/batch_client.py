"""Send many Messages API requests through the Anthropic Message Batches API, resumably.

``JobRunner`` (requests and results: ``interpret.requests``) owns two files in a work directory, per job kind (``labels``, ``score``):

- ``{kind}.state.json`` (rewritten atomically): the batches sent (id, the custom_ids in each, collected
  or not), the requests' metadata (what a reply is checked against, e.g. the hidden truth of a detection
  question), and an *intent* written just before ``batches.create`` so that a kill between the create
  call and the state update can be recovered by finding the batch again instead of sending it twice.
- ``{kind}.results.jsonl`` (append-only): one line per request outcome, written as results are read.
  A request is done when it has a final line (``ok``, a parse failure, a non-retryable error, or a
  retryable one after ``max_attempts`` tries); expired, canceled and transiently errored requests get a
  non-final line and go into a later batch.

Killing the process at any point and rerunning the same command continues: batches in flight are polled
(not resent), results already written are not written again, and nothing unsent is forgotten. The API
key is only ever read by the SDK from ``ANTHROPIC_API_KEY``; nothing here writes it anywhere.
HTTP-level retries (429, 5xx, connection errors, with exponential backoff honouring ``retry-after``)
are the SDK's, configured through ``max_retries``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llama3_sae.files import atomic_write_json

from .requests import (Handler, Outcome, Request, RequestStatus, ResultsLog, custom_id_in, now_iso,
                       outcome_from_result, parse_result_line, parse_time, request_status, usage_of)
from .parsing import reply_text

STATE_FORMAT = "llama3-sae-interpret-state"
STATE_VERSION = 1

# Hard limits of the Message Batches API per batch (docs: 100,000 requests or 256 MB).
API_MAX_REQUESTS = 100_000
API_MAX_MB = 256.0

def make_client(*, max_retries: int, timeout_s: float, kind: str = "labels"):
    """An ``anthropic.Anthropic`` client; the key comes from ``ANTHROPIC_API_KEY`` only (and the SDK
    reads ``ANTHROPIC_BASE_URL`` itself)."""
    try:
        import anthropic
    except ImportError:
        raise SystemExit("the interpret commands need the Anthropic SDK: pip install 'llama3-sae[interpret]' "
                         "(or pip install anthropic)") from None
    key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
    if not key:
        offline = ("or label without an API with `llama3-sae interpret --heuristic`" if kind == "labels" else
                   "scoring asks the LLM to predict from each label which documents activate, so it has no "
                   "offline mode")
        raise SystemExit("ANTHROPIC_API_KEY is not set: export your Anthropic API key in the environment (it is "
                         f"read from there only); {offline}")
    # Passed explicitly so the SDK consults no other credential source (profiles, auth tokens on disk).
    return anthropic.Anthropic(api_key=key, max_retries=max_retries, timeout=timeout_s)


class ResultsStreamError(RuntimeError):
    """The connection broke while a batch's results were streamed; what was read is saved."""


@dataclass
class RunnerOptions:
    max_requests_per_batch: int = 10_000
    max_batch_mb: float = 200.0
    poll_interval_s: float = 30.0
    max_attempts: int = 3
    retry_failed: bool = False
    progress: bool = True


@dataclass
class RunSummary:
    ok: int = 0
    failed: int = 0
    """Requests with a final failure line (parse failures, non-retryable errors, retries used up)."""
    sent: int = 0
    """Requests sent in this run (including retries)."""
    batches_created: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    """Usage of the replies read in this run."""
    aborted: bool = False


class JobRunner:
    """Runs one kind of job (``labels``, ``score``) in ``workdir`` through a Message Batches client."""

    def __init__(self, client: Any, workdir: Path, kind: str, options: RunnerOptions, *,
                 console: Console | None = None, redo: bool = False):
        self.client = client
        self.workdir = Path(workdir)
        self.kind = kind
        self.opt = options
        self.console = console or Console(stderr=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.workdir / f"{kind}.state.json"
        self.results = ResultsLog(self.workdir / f"{kind}.results.jsonl", self.console)
        self.state = self._load_state()
        if redo:
            # Start over for every request: earlier lines stay in the log for the record, but only lines of
            # the new generation count. Batches still in flight are collected (they were paid for).
            self.state["generation"] += 1
            self._save()

    # ------------------------------------------------------------------ state
    def _load_state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {"format": STATE_FORMAT, "version": STATE_VERSION, "kind": self.kind, "generation": 0,
                    "batches": [], "intent": None, "meta": {}}
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.state_path} is not valid JSON ({e}); it is written atomically, so it was "
                             "edited by hand. Restore it, or delete it to forget batches in flight (their "
                             "requests are then sent again)") from None
        if state.get("format") != STATE_FORMAT or state.get("kind") != self.kind:
            raise ValueError(f"{self.state_path} is not a {self.kind!r} job state of this project "
                             f"(format {state.get('format')!r}, kind {state.get('kind')!r})")
        if state.get("version", 0) > STATE_VERSION:
            raise ValueError(f"{self.state_path} has version {state['version']}, newer than this code "
                             f"({STATE_VERSION}); upgrade llama3-sae")
        return state

    def _save(self) -> None:
        atomic_write_json(self.state_path, self.state)

    @property
    def generation(self) -> int:
        return int(self.state["generation"])

    def in_flight(self) -> list[dict[str, Any]]:
        return [b for b in self.state["batches"] if not b["collected"]]

    def statuses(self, custom_ids: Iterable[str]) -> dict[str, RequestStatus]:
        hist = self.results.history(self.generation)
        return {cid: request_status(hist.get(cid, []), False) for cid in custom_ids}

    def _retry_failures_once(self, custom_ids: Iterable[str]) -> None:
        """``--retry-failed``: the requests that had failed for good when this run started get a fresh set of
        ``max_attempts`` tries (a ``reset`` line); what fails again in this run stays failed, so the run ends."""
        if not self.opt.retry_failed:
            return
        failed = [cid for cid, s in self.statuses(custom_ids).items()
                  if s.failed]
        if failed:
            self.reset(failed, "retry-failed")
            self.console.print(f"retrying {len(failed)} request(s) that had failed, up to {self.opt.max_attempts} "
                               "attempts each")

    def reset(self, custom_ids: Iterable[str], note: str) -> None:
        """Make requests pending again (e.g. a detection score whose label has changed since): a ``reset``
        line hides their earlier lines from the done/attempt bookkeeping, without deleting them."""
        for cid in custom_ids:
            self.results.append({"custom_id": cid, "generation": self.generation, "status": "reset",
                                 "time": now_iso(), "note": note})

    # ------------------------------------------------------------------ records
    def _write(self, outcome: Outcome, meta: dict[str, Any], handle: Handler, attempts_before: int,
               generation: int | None = None) -> dict[str, Any]:
        """Append the line for one outcome. ``attempts_before``: non-final tries already recorded."""
        gen = self.generation if generation is None else generation
        rec: dict[str, Any] = {"custom_id": outcome.custom_id, "generation": gen,
                               "batch_id": outcome.batch_id, "time": now_iso()}
        if outcome.kind == "succeeded":
            rec.update(handle(outcome, meta))
            rec.setdefault("final", True)
            rec["usage"] = outcome.usage
            if rec["status"] != "ok":
                rec.setdefault("raw", outcome.text)
                rec["stop_reason"] = outcome.stop_reason
        else:
            last_try = attempts_before + 1 >= self.opt.max_attempts
            rec.update(status=outcome.kind, final=not outcome.retryable or last_try)
            if outcome.kind == "errored":
                rec["error"] = {"type": outcome.error_type, "message": outcome.error_message}
            if outcome.retryable and last_try:
                rec["note"] = f"gave up after {self.opt.max_attempts} attempts"
        self.results.append(rec)
        return rec

    # ------------------------------------------------------------------ batches
    def run_batches(self, requests: Sequence[Request], handle: Handler,
                    confirm: Callable[[list[Request]], bool]) -> RunSummary:
        """Send what is not done, wait, collect, resend what expired/was canceled/errored transiently,
        until every request is done or out of attempts. ``confirm`` sees the first requests this run
        would send and may refuse (the run then stops before sending anything)."""
        summary = RunSummary()
        by_id = {r.custom_id: r for r in requests}
        if len(by_id) != len(requests):
            raise ValueError("duplicate custom_id in the requests")
        confirmed = False
        self._resolve_intent()
        self._retry_failures_once(by_id)
        while True:
            flying = {cid for b in self.in_flight() for cid in b["custom_ids"]}
            st = self.statuses(by_id)
            pending = [by_id[cid] for cid, s in st.items() if not s.done and cid not in flying]
            if pending:
                if not confirmed:
                    if not confirm(pending):
                        summary.aborted = True
                        return summary
                    confirmed = True
                self._submit(pending, summary)
            if not self.in_flight():
                break
            self._wait_and_collect(handle, summary)
        self._tally(by_id, summary)
        return summary

    def _tally(self, custom_ids: Iterable[str], summary: RunSummary) -> None:
        for s in self.statuses(custom_ids).values():
            if s.done and s.last is not None:
                if s.last.get("status") == "ok":
                    summary.ok += 1
                else:
                    summary.failed += 1

    def chunks(self, pending: list[Request]) -> list[list[Request]]:
        max_n = min(self.opt.max_requests_per_batch, API_MAX_REQUESTS)
        max_bytes = int(min(self.opt.max_batch_mb, API_MAX_MB) * 1024 * 1024) - 1024  # room for the envelope
        chunks: list[list[Request]] = []
        cur: list[Request] = []
        cur_bytes = 0
        for r in pending:
            size = r.json_bytes() + 2
            if size > max_bytes:
                raise ValueError(f"request {r.custom_id} alone is {size / 2**20:.1f} MiB, over the batch size limit "
                                 f"of {max_bytes / 2**20:.0f} MiB; use fewer or shorter examples per prompt")
            if cur and (len(cur) >= max_n or cur_bytes + size > max_bytes):
                chunks.append(cur)
                cur, cur_bytes = [], 0
            cur.append(r)
            cur_bytes += size
        if cur:
            chunks.append(cur)
        return chunks

    def _submit(self, pending: list[Request], summary: RunSummary) -> None:
        for chunk in self.chunks(pending):
            ids = [r.custom_id for r in chunk]
            for r in chunk:
                self.state["meta"][r.custom_id] = r.meta
            # Written before the create call: if we die between the call and the save below, the next run
            # finds the created batch by this intent instead of sending the requests a second time.
            self.state["intent"] = {"custom_ids": ids, "since": now_iso()}
            self._save()
            batch = self.client.messages.batches.create(
                requests=[{"custom_id": r.custom_id, "params": r.params} for r in chunk])
            self.state["batches"].append({"id": batch.id, "custom_ids": ids, "created_at": now_iso(),
                                          "collected": False, "generation": self.generation})
            self.state["intent"] = None
            self._save()
            summary.sent += len(chunk)
            summary.batches_created += 1
            self.console.print(f"sent batch {batch.id} with {len(chunk)} requests")

    def _resolve_intent(self) -> None:
        """After a kill between ``batches.create`` and the state save: adopt the batch that was created, or
        conclude none was. A candidate (unknown to the state, created since the intent, the same request
        count) is adopted only when its results hold exactly the intent's custom_ids, which needs it to have
        ended: in-progress candidates are waited for. Any other batch, however alike, is left alone."""
        intent = self.state.get("intent")
        if not intent:
            return
        known = {b["id"] for b in self.state["batches"]}
        since = parse_time(intent["since"]) - _dt.timedelta(minutes=2)
        found = []
        seen: set[str] = set()
        for b in self.client.messages.batches.list(limit=100):
            # Guards against a listing that repeats itself; 1,000 batches reach far past any interruption.
            if b.id in seen or len(seen) >= 1000:
                break
            seen.add(b.id)
            created = parse_time(b.created_at)
            if created < since:
                break  # the list is newest first
            total = sum(int(v or 0) for v in b.request_counts.to_dict().values())
            if b.id not in known and total == len(intent["custom_ids"]):
                found.append((created, b.id))
        found.sort()
        batch_id = next((bid for _, bid in found if self._holds_exactly(bid, set(intent["custom_ids"]))), None)
        if batch_id is not None:
            self.console.print(f"[yellow]the previous run was interrupted right after sending a batch; adopting "
                               f"batch {batch_id} ({len(intent['custom_ids'])} requests) instead of resending[/]")
            self.state["batches"].append({"id": batch_id, "custom_ids": intent["custom_ids"],
                                          "created_at": now_iso(), "collected": False, "adopted": True,
                                          "generation": self.generation})
        self.state["intent"] = None
        self._save()

    def _holds_exactly(self, batch_id: str, custom_ids: set[str]) -> bool:
        """Whether batch ``batch_id``'s results are exactly ``custom_ids`` (waiting for it to end first)."""
        while self.client.messages.batches.retrieve(batch_id).processing_status != "ended":
            self.console.print(f"waiting for batch {batch_id} to end, to check whether it is the one the interrupted "
                               "run sent")
            time.sleep(self.opt.poll_interval_s)
        got = set()
        for raw in self._result_lines(batch_id):
            parsed = parse_result_line(raw)
            got.add(str(parsed.get("custom_id")) if isinstance(parsed, dict) else custom_id_in(raw))
        return got == custom_ids

    def _result_lines(self, batch_id: str) -> Iterator[str]:
        """The raw lines of a batch's results: parsed here, one at a time, so that one malformed line is that
        item's failure instead of ending the stream."""
        decoder = self.client.messages.batches.results(batch_id)
        response = getattr(decoder, "http_response", None)
        if response is None:  # a client without the raw response: its parsed items, re-serialised
            for item in decoder:
                yield json.dumps(item if isinstance(item, dict) else item.to_dict(mode="json"))
            return
        for line in response.iter_lines():
            if line.strip():
                yield line

    def _wait_and_collect(self, handle: Handler, summary: RunSummary) -> None:
        """Poll the batches in flight until each has ended, collecting each as it ends."""
        import anthropic

        flying = self.in_flight()
        total = sum(len(b["custom_ids"]) for b in flying)
        counts: dict[str, int] = {}
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
        with Progress(*columns, console=self.console, disable=not self.opt.progress) as progress:
            task = progress.add_task(f"{self.kind}: {len(flying)} batch(es)", total=total, detail="")
            while flying:
                for b in list(flying):
                    try:
                        mb = self.client.messages.batches.retrieve(b["id"])
                    except anthropic.NotFoundError:
                        self.console.print(f"[red]batch {b['id']} no longer exists on the server; its "
                                           f"{len(b['custom_ids'])} requests are sent again[/]")
                        self._collect(b, handle, summary, items=[])
                        flying.remove(b)
                        continue
                    rc = mb.request_counts.to_dict()
                    counts[b["id"]] = sum(int(v or 0) for k, v in rc.items() if k != "processing")
                    if mb.processing_status == "ended":
                        self._collect(b, handle, summary)
                        counts[b["id"]] = len(b["custom_ids"])
                        flying.remove(b)
                    progress.update(task, completed=sum(counts.values()),
                                    detail=f"{len(flying)} in flight")
                if flying:
                    time.sleep(self.opt.poll_interval_s)

    def _collect(self, entry: dict[str, Any], handle: Handler, summary: RunSummary,
                 items: Iterable[Any] | None = None) -> None:
        expected = set(entry["custom_ids"])
        gen = entry.get("generation", self.generation)
        # Lines already written for this batch by an earlier, interrupted collection.
        written = {r["custom_id"] for r in self.results.records if r.get("batch_id") == entry["id"]}
        hist = self.results.history(gen)
        foreign = 0
        stream = iter(self._result_lines(entry["id"]) if items is None else (json.dumps(i) for i in items))
        while True:
            try:
                raw = next(stream)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - transport errors of the streamed body are not wrapped by the SDK
                raise ResultsStreamError(f"reading the results of batch {entry['id']} failed ({type(e).__name__}: "
                                         f"{e}); the {len(written)} results read so far are saved, rerun the same "
                                         "command to read the rest") from e
            d = parse_result_line(raw)
            if d is None:  # not JSON, or not a result object: that item's failure, kept with its raw text
                cid = custom_id_in(raw)
                if cid in expected and cid not in written:
                    self.results.append({"custom_id": cid, "generation": gen, "batch_id": entry["id"],
                                         "time": now_iso(), "status": "malformed_result", "final": True,
                                         "raw": _short(raw, 2000)})
                    written.add(cid)
                elif cid not in expected:
                    foreign += 1
                continue
            cid = str(d.get("custom_id"))
            if cid not in expected:
                foreign += 1
                continue
            if cid in written:
                continue
            outcome = outcome_from_result(d, entry["id"])
            attempts = request_status(hist.get(cid, []), False).attempts
            rec = self._write(outcome, self.state["meta"].get(cid, {}), handle, attempts, gen)
            written.add(cid)
            summary.input_tokens += rec.get("usage", {}).get("input_tokens", 0)
            summary.output_tokens += rec.get("usage", {}).get("output_tokens", 0)
        for cid in sorted(expected - written):
            attempts = request_status(hist.get(cid, []), False).attempts
            self._write(Outcome(cid, "missing", batch_id=entry["id"]), {}, handle, attempts, gen)
        if foreign:
            why = " (the batch was adopted after an interruption)" if entry.get("adopted") else ""
            self.console.print(f"[yellow]batch {entry['id']}: {foreign} results with custom_ids this job did not "
                               f"send were ignored{why}[/]")
        entry["collected"] = True
        self._save()

    # ------------------------------------------------------------------ synchronous
    def run_sync(self, requests: Sequence[Request], handle: Handler,
                 confirm: Callable[[list[Request]], bool]) -> RunSummary:
        """The same job with plain ``messages.create`` calls, one request at a time (for a handful of
        latents: answers in seconds, at the full, non-batch price). Resumable through the same results log."""
        import anthropic

        summary = RunSummary()
        by_id = {r.custom_id: r for r in requests}
        self._retry_failures_once(by_id)
        st = self.statuses(by_id)
        pending = [r for r in requests if not st[r.custom_id].done]
        if pending and not confirm(pending):
            summary.aborted = True
            return summary
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, disable=not self.opt.progress) as progress:
            task = progress.add_task(f"{self.kind} (sync)", total=len(pending))
            for r in pending:
                attempts = st[r.custom_id].attempts
                while True:
                    summary.sent += 1
                    try:
                        msg = self.client.messages.create(**r.params).to_dict(mode="json")

                        outcome = Outcome(r.custom_id, "succeeded", text=reply_text(msg.get("content")),
                                          stop_reason=msg.get("stop_reason"), usage=usage_of(msg.get("usage")))
                    except anthropic.APIStatusError as e:
                        # The SDK has already retried 429/5xx max_retries times when this surfaces.
                        etype = getattr(e, "type", None) or _error_type_of(e)
                        outcome = Outcome(r.custom_id, "errored", error_type=etype or f"http_{e.status_code}",
                                          error_message=_short(str(getattr(e, "message", e))))
                    except anthropic.APIConnectionError as e:
                        outcome = Outcome(r.custom_id, "errored", error_type="api_error",
                                          error_message=f"connection failed: {type(e).__name__}")
                    self.state["meta"][r.custom_id] = r.meta
                    rec = self._write(outcome, r.meta, handle, attempts)
                    summary.input_tokens += rec.get("usage", {}).get("input_tokens", 0)
                    summary.output_tokens += rec.get("usage", {}).get("output_tokens", 0)
                    if rec.get("final") or rec.get("status") == "ok":
                        break
                    attempts += 1
                progress.advance(task)
        self._tally(by_id, summary)
        return summary


def _error_type_of(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("type"), str):
            return err["type"]
    return ""


def _short(s: str, n: int = 500) -> str:
    # Error texts go into the results file; keep them readable but say when they were shortened.
    return s if len(s) <= n else s[:n] + f" ... [{len(s) - n} more characters]"

