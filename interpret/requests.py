"""One job's requests and what came back: ``Request``, ``Outcome`` (a batch result line parsed, every
result type handled), the append-only results log, and where each request stands from its lines. The
runner that sends them is ``interpret.batch_client``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from rich.console import Console

from llama3_sae.errors import naming

from .parsing import reply_text

# Errors inside a batch result worth another try; the rest (invalid_request_error, authentication_error,
# permission_error, not_found_error, request_too_large, billing_error, ...) would fail the same way again.
RETRYABLE_ERROR_TYPES = frozenset({"api_error", "overloaded_error", "rate_limit_error", "timeout_error",
                                   "gateway_timeout_error"})


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def parse_time(value: Any) -> _dt.datetime:
    if isinstance(value, _dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)
    return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass
class Request:
    """One Messages API request of a job."""

    custom_id: str
    """Unique within the job (this project: the latent index); how results are matched to requests."""
    params: dict[str, Any]
    """Keyword arguments of ``messages.create`` (model, max_tokens, system, messages, ...)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Kept in the state file and handed back with the result (e.g. the truth a reply is scored against)."""

    def json_bytes(self) -> int:
        return len(json.dumps({"custom_id": self.custom_id, "params": self.params}).encode())

    def prompt_chars(self) -> int:
        n = len(self.params.get("system") or "")
        for m in self.params.get("messages", ()):
            c = m.get("content")
            n += len(c) if isinstance(c, str) else sum(len(b.get("text", "")) for b in c)
        return n


@dataclass
class Outcome:
    """What came back for one request, whichever way it was sent."""

    custom_id: str
    kind: Literal["succeeded", "errored", "canceled", "expired", "missing"]
    """``missing``: the batch's results had no line for this request (or the batch vanished)."""
    text: str = ""
    """The reply's text blocks (succeeded)."""
    stop_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    error_type: str = ""
    error_message: str = ""
    batch_id: str | None = None
    """None for synchronous requests."""

    @property
    def retryable(self) -> bool:
        if self.kind in ("canceled", "expired", "missing"):
            return True
        return self.kind == "errored" and self.error_type in RETRYABLE_ERROR_TYPES


# handle(outcome, meta) -> the fields of the result line: at least "status" ("ok" or a failure name).
# It is only called for succeeded outcomes; failures are recorded by the runner itself.
Handler = Callable[[Outcome, dict[str, Any]], dict[str, Any]]


def outcome_from_result(item: dict[str, Any], batch_id: str) -> Outcome:
    """A line of a batch's results (as a dict) -> ``Outcome``; every result type is handled."""

    cid = str(item.get("custom_id"))
    result = item.get("result") or {}
    kind = result.get("type")
    if kind == "succeeded":
        msg = result.get("message") or {}
        return Outcome(cid, "succeeded", text=reply_text(msg.get("content")), stop_reason=msg.get("stop_reason"),
                       usage=usage_of(msg.get("usage")), batch_id=batch_id)
    if kind == "errored":
        err = result.get("error") or {}
        inner = err.get("error") if isinstance(err.get("error"), dict) else err
        return Outcome(cid, "errored", error_type=str(inner.get("type", "unknown_error")),
                       error_message=str(inner.get("message", "")), batch_id=batch_id)
    if kind in ("canceled", "expired"):
        return Outcome(cid, kind, batch_id=batch_id)
    return Outcome(cid, "errored", error_type="unknown_result_type",
                   error_message=f"result type {kind!r} not known to this version", batch_id=batch_id)


def usage_of(usage: Any) -> dict[str, int]:
    if not isinstance(usage, dict):
        return {}
    return {k: int(v) for k, v in usage.items() if k in ("input_tokens", "output_tokens") and isinstance(v, int)}


class ResultsLog:
    """The append-only ``{kind}.results.jsonl``; each line is flushed and fsynced as it is written."""

    def __init__(self, path: Path, console: Console):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            self._load(console)

    def _load(self, console: Console) -> None:
        raw = self.path.read_bytes()
        good_end = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a line cut by a kill mid-write: dropped below, and its request is redone
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{self.path}: line {len(self.records) + 1} is not JSON; this file is written "
                                 "only by llama3-sae, so it was edited or damaged. Fix or delete that line "
                                 "(its request is then redone) and rerun") from None
            self.records.append(rec)
            good_end += len(line)
        if good_end < len(raw):
            console.print(f"[yellow]{self.path.name}: dropping a half-written last line (the previous run was "
                          "killed while writing it); that request's result is read again[/]")
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def append(self, record: dict[str, Any]) -> None:
        with naming(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def history(self, generation: int) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for rec in self.records:
            if rec.get("generation", 0) == generation:
                out.setdefault(rec["custom_id"], []).append(rec)
        return out


@dataclass
class RequestStatus:
    done: bool
    """Has an ``ok`` line, or a final failure (and failures are not being retried)."""
    attempts: int
    """Non-final tries since the last final line (what ``max_attempts`` counts)."""
    last: dict[str, Any] | None

    @property
    def failed(self) -> bool:
        """Ended with a final failure."""
        return self.done and self.last is not None and self.last.get("status") != "ok"


def request_status(records: Sequence[dict[str, Any]], retry_failed: bool) -> RequestStatus:
    """Where one request stands, from its result lines (only those after its last ``reset`` line count)."""
    resets = [i for i, r in enumerate(records) if r.get("status") == "reset"]
    if resets:
        records = records[resets[-1] + 1:]
    if any(r.get("status") == "ok" for r in records):
        return RequestStatus(True, 0, records[-1])
    attempts = 0
    for r in records:
        if r.get("final"):
            attempts = 0
        else:
            attempts += 1
    if records and records[-1].get("final"):
        return RequestStatus(not retry_failed, 0, records[-1])
    return RequestStatus(False, attempts, records[-1] if records else None)


_CUSTOM_ID = re.compile(r'"custom_id"\s*:\s*"([^"]{1,64})"')


def parse_result_line(raw: str) -> dict[str, Any] | None:
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("custom_id"), str) else None


def custom_id_in(raw: str) -> str | None:
    """The custom_id a damaged result line names, if it can still be read."""
    m = _CUSTOM_ID.search(raw if isinstance(raw, str) else str(raw))
    return m.group(1) if m else None
