"""The interpret/score commands against a local fake of the Anthropic Messages + Message Batches API.

``FakeAnthropic`` is an HTTP server on 127.0.0.1 (a thread) speaking the endpoints the real ``anthropic``
client calls: POST/GET /v1/messages/batches, GET .../{id}, GET .../{id}/results (JSONL, shuffled),
POST /v1/messages, POST /v1/messages/count_tokens. Per-request scripts make items errored, expired,
canceled or missing, replies malformed, and calls fail with 429/5xx, so the client's handling of each is
exercised through real HTTP.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("anthropic")

from interpret.batch_client import ResultsStreamError  # noqa: E402
from interpret.config import InterpretConfig, ScoreConfig  # noqa: E402
from interpret.labels import run_interpret  # noqa: E402
from interpret.records import (EXAMPLES_FILE, EXAMPLES_FORMAT, EXAMPLES_META, DocExample,  # noqa: E402
                               LatentExamples, read_latents)
from interpret.scoring import run_score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-ant-test-" + "S3CRET" * 4
_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


# ---------------------------------------------------------------------- the fake server
def label_reply(latent: int) -> str:
    return ("<semantic_analysis>\n1. Key words: cat.\n2. Grouping: animals.\n3. Outliers: none.\n"
            f"</semantic_analysis>\n{{\"common_semantic\": \"concept {latent}\", \"certainty\": 0.9}}")


def default_responder(params: dict[str, Any]) -> str:
    user = params["messages"][0]["content"]
    if user.startswith("Description:"):
        # Detection: say "fires" exactly for documents that mention a cat (the fixtures' activating ones).
        docs = re.findall(r"^\d+\. (.*)$", user.split("Documents:", 1)[1], flags=re.M)
        return "<analysis>cats</analysis>\n" + json.dumps({"answers": [int("cat" in d) for d in docs]})
    latent = int(re.match(r"Latent (\d+)\.", user).group(1))
    return label_reply(latent)


class FakeAnthropic:
    """Scripts: ``script[custom_id]`` is a list of outcomes, one per batch the request appears in (the last
    repeats): "ok", "text:<reply>", "errored:<error type>", "expired", "canceled", "missing"."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.script: dict[str, list[str]] = {}
        self.seen: Counter[str] = Counter()          # custom_id -> batches it appeared in
        self.create_calls = 0                         # POST /v1/messages/batches, 429s included
        self.fail_creates = 0                         # answer this many create calls with 429
        self.fail_retrieves = 0                       # answer this many retrieve calls with 503
        self.fail_messages = 0                        # answer this many POST /v1/messages with 429
        self.hold = False                             # keep batches in progress while True
        self.polls_to_end = 1
        self.cut_results_after: int | None = None     # drop the connection after this many result lines (once)
        self.malformed: set[str] = set()              # custom_ids whose result line is cut short (not JSON)
        self.message_calls = 0
        self.count_calls = 0
        self.keys: set[str] = set()
        self.responder = default_responder
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeAnthropic":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def creates(self) -> int:
        return len(self.batches)

    def sent_ids(self) -> list[str]:
        return [r["custom_id"] for bid in self.order for r in self.batches[bid]["requests"]]

    # -------------------------------------------------------------- objects
    def _batch_json(self, bid: str) -> dict[str, Any]:
        b = self.batches[bid]
        ended = b["ended"]
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            for kind, _ in b["outcomes"].values():
                counts["succeeded" if kind in ("ok", "text") else kind if kind != "missing" else "errored"] += 1
        else:
            counts["processing"] = len(b["requests"])
        return {"id": bid, "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
                "request_counts": counts, "created_at": b["created_at"], "expires_at": b["created_at"],
                "ended_at": b["created_at"] if ended else None, "archived_at": None, "cancel_initiated_at": None,
                "results_url": f"{self.url}/v1/messages/batches/{bid}/results" if ended else None}

    def _message(self, params: dict[str, Any], text: str) -> dict[str, Any]:
        return {"id": "msg_" + uuid.uuid4().hex[:12], "type": "message", "role": "assistant",
                "model": params["model"], "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": 100, "output_tokens": 50}}

    def _outcome(self, cid: str, params: dict[str, Any]) -> tuple[str, str]:
        steps = self.script.get(cid, ["ok"])
        step = steps[min(self.seen[cid], len(steps) - 1)]
        self.seen[cid] += 1
        if step == "ok":
            return "ok", self.responder(params)
        if step.startswith("text:"):
            return "text", step[5:]
        if step.startswith("errored:"):
            return "errored", step[8:]
        return step, ""

    def _result_line(self, bid: str, cid: str) -> dict[str, Any] | None:
        b = self.batches[bid]
        kind, payload = b["outcomes"][cid]
        params = b["params"][cid]
        if kind in ("ok", "text"):
            return {"custom_id": cid, "result": {"type": "succeeded", "message": self._message(params, payload)}}
        if kind == "errored":
            return {"custom_id": cid, "result": {"type": "errored", "error": {
                "type": "error", "error": {"type": payload, "message": f"fake {payload}"}}}}
        if kind in ("expired", "canceled"):
            return {"custom_id": cid, "result": {"type": kind}}
        return None  # missing

    # -------------------------------------------------------------- HTTP
    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, code: int, etype: str, msg: str) -> None:
                self._send(code, {"type": "error", "error": {"type": etype, "message": msg}},
                           {"retry-after-ms": "1"} if code in (429, 503) else None)

            def _auth(self) -> bool:
                # SDKs send the key as x-api-key (older) or as a Bearer token (newer).
                bearer = self.headers.get("authorization", "")
                key = self.headers.get("x-api-key") or (bearer[7:] if bearer.startswith("Bearer ") else None)
                fake.keys.add(str(key))
                if key != KEY or not self.headers.get("anthropic-version"):
                    self._error(401, "authentication_error", "invalid x-api-key")
                    return False
                return True

            def _body(self) -> Any:
                n = int(self.headers.get("content-length", 0))
                return json.loads(self.rfile.read(n) or b"{}")

            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                if not self._auth():
                    return
                path = self.path.split("?")[0]
                with fake.lock:
                    if path == "/v1/messages/batches":
                        fake.create_calls += 1
                        if fake.fail_creates > 0:
                            fake.fail_creates -= 1
                            return self._error(429, "rate_limit_error", "slow down")
                        reqs = body["requests"]
                        ids = [r["custom_id"] for r in reqs]
                        assert len(set(ids)) == len(ids) and all(_ID_RE.match(i) for i in ids), ids
                        for r in reqs:
                            p = r["params"]
                            assert p["model"] and p["max_tokens"] > 0 and p["messages"], p
                        bid = "msgbatch_" + uuid.uuid4().hex[:16]
                        fake.batches[bid] = {
                            "requests": reqs, "params": {r["custom_id"]: r["params"] for r in reqs},
                            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "polls": 0,
                            "ended": False, "outcomes": {r["custom_id"]: fake._outcome(r["custom_id"], r["params"])
                                                         for r in reqs}}
                        fake.order.append(bid)
                        return self._send(200, fake._batch_json(bid))
                    if path == "/v1/messages/count_tokens":
                        fake.count_calls += 1
                        n = sum(len(m["content"]) for m in body["messages"]) + len(body.get("system", ""))
                        return self._send(200, {"input_tokens": n // 4})
                    if path == "/v1/messages":
                        fake.message_calls += 1
                        if fake.fail_messages > 0:
                            fake.fail_messages -= 1
                            return self._error(429, "rate_limit_error", "slow down")
                        cid = re.match(r"(?:Latent (\d+)\.)?", body["messages"][0]["content"]).group(1) or "sync"
                        kind, payload = fake._outcome(cid, body)
                        if kind == "errored":
                            return self._error(400 if payload == "invalid_request_error" else 529, payload, "fake")
                        return self._send(200, fake._message(body, payload))
                self._error(404, "not_found_error", f"no route {path}")

            def do_GET(self) -> None:  # noqa: N802
                if not self._auth():
                    return
                path = self.path.split("?")[0]
                m = re.fullmatch(r"/v1/messages/batches/([\w-]+)(/results)?", path)
                with fake.lock:
                    if path == "/v1/messages/batches":
                        # Newest first, paged by after_id/limit as the API does.
                        q = dict(x.split("=", 1) for x in self.path.partition("?")[2].split("&") if "=" in x)
                        ids = list(reversed(fake.order))
                        if "after_id" in q:
                            ids = ids[ids.index(q["after_id"]) + 1:] if q["after_id"] in ids else []
                        limit = int(q.get("limit", 20))
                        data = [fake._batch_json(b) for b in ids[:limit]]
                        return self._send(200, {"data": data, "has_more": len(ids) > limit,
                                                "first_id": data[0]["id"] if data else None,
                                                "last_id": data[-1]["id"] if data else None})
                    if m is None or m.group(1) not in fake.batches:
                        return self._error(404, "not_found_error", "no such batch")
                    bid = m.group(1)
                    b = fake.batches[bid]
                    if not m.group(2):
                        if fake.fail_retrieves > 0:
                            fake.fail_retrieves -= 1
                            return self._error(503, "overloaded_error", "busy")
                        b["polls"] += 1
                        if not fake.hold and b["polls"] >= fake.polls_to_end:
                            b["ended"] = True
                        return self._send(200, fake._batch_json(bid))
                    if not b["ended"]:
                        return self._error(400, "invalid_request_error", "not ended")
                    ids = list(b["outcomes"])
                    random.Random(bid).shuffle(ids)  # results come out of order
                    lines = [fake._result_line(bid, cid) for cid in ids]
                    lines = [(json.dumps(x)[:-7] if x["custom_id"] in fake.malformed else json.dumps(x)) + "\n"
                             for x in lines if x is not None]
                    cut = fake.cut_results_after
                    fake.cut_results_after = None
                body = "".join(lines).encode()
                self.send_response(200)
                self.send_header("content-type", "application/binary")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if cut is not None:
                    # A dropped connection in the middle of the results stream.
                    self.wfile.write("".join(lines[:cut]).encode())
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        return Handler


# ---------------------------------------------------------------------- fixtures
def write_examples(sae_dir: Path, n_latents: int = 12, dead: tuple[int, ...] = (11,)) -> Path:
    """A small top_examples.jsonl: activating documents mention a cat, random ones a dog."""
    sae_dir.mkdir(parents=True, exist_ok=True)
    with open(sae_dir / EXAMPLES_FILE, "w") as f:
        for lat in range(n_latents):
            if lat in dead:
                rec = LatentExamples(lat, {"docs": 500, "tokens": 3000, "active_docs": 0, "active_tokens": 0,
                                           "max": 0.0, "sum": 0.0}, {"max": [], "mean": [], "last": []}, [], [], [])
                f.write(json.dumps(rec.to_json()) + "\n")
                continue
            docs: dict[int, DocExample] = {}
            act = [lat * 1000 + i for i in range(14)]
            for i, d in enumerate(act):
                docs[d] = DocExample(d, ["The", " cat", f" number {i}", " sat", "."], [(1, 1.0 + i), (3, 0.5)])
            rnd = [lat * 1000 + 500 + i for i in range(8)]
            for d in rnd:
                docs[d] = DocExample(d, ["A", " dog", " ran", "."], [])
            top = {"max": [(d, 1.0 + i) for i, d in reversed(list(enumerate(act[:6])))],
                   "mean": [(d, 0.3) for d in act[:4]], "last": []}
            quant = [{"lo": 1.0, "hi": 3.0, "examples": [(act[6], 2.0), (act[7], 2.5)]},
                     {"lo": 3.0, "hi": 9.0, "examples": [(act[8], 4.0)]}]
            rec = LatentExamples(lat, {"docs": 500, "tokens": 3000, "active_docs": 14, "active_tokens": 28,
                                       "max": 14.0, "sum": 120.0}, top, quant,
                                 [(d, 1.0) for d in act[9:14]], rnd, docs)
            f.write(json.dumps(rec.to_json()) + "\n")
    (sae_dir / EXAMPLES_META).write_text(json.dumps({"format": EXAMPLES_FORMAT, "version": 1, "complete": True,
                                                     "n_latents": n_latents}))
    return sae_dir


@pytest.fixture
def fake(monkeypatch):
    server = FakeAnthropic().start()
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    for var in ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    yield server
    server.stop()


def fast(**kw: Any) -> dict[str, Any]:
    return dict(yes=True, poll_interval_s=0.01, progress=False, max_retries=3, count_tokens_sample=2, **kw)


def results(sae: Path, kind: str = "labels") -> list[dict[str, Any]]:
    path = sae / "interpret" / f"{kind}.results.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_no_duplicates(recs: list[dict[str, Any]]) -> None:
    keys = [(r["custom_id"], r.get("batch_id")) for r in recs if r.get("batch_id")]
    dup = [k for k, n in Counter(keys).items() if n > 1]
    assert not dup, f"results written twice: {dup}"


# ---------------------------------------------------------------------- tests
def test_batches_every_result_type(fake, tmp_path, capsys):
    sae = write_examples(tmp_path / "sae")
    fake.fail_creates = 1  # the first create gets a 429: the SDK must retry it
    fake.script = {
        "1": ["expired", "ok"],
        "2": ["errored:overloaded_error", "ok"],
        "3": ["errored:invalid_request_error"],
        "4": ["text:I am not sure what these have in common."],
        "5": ['text:<semantic_analysis>x</semantic_analysis>\n```json\n{"common_semantic": "felines", '
              '"certainty": 1}\n```\nHope this helps!'],
        "6": ["canceled"],
        "7": ["missing", "ok"],
        "8": ['text:{"common_semantic": "eight", "certainty": "80%"} trailing words'],
    }
    cfg = InterpretConfig(sae=sae, max_requests_per_batch=4, max_attempts=2, **fast())
    code = run_interpret(cfg)
    assert code == 3  # finished, with failures

    # 429 retried by the SDK: one more create call than batches created, and no request sent twice at once.
    assert fake.create_calls == fake.creates + 1
    assert all(len(b["requests"]) <= 4 for b in fake.batches.values())
    first_round = fake.sent_ids()[:11]
    assert sorted(first_round, key=int) == [str(i) for i in range(11)]  # dead latent 11 never sent
    assert fake.seen["1"] == 2 and fake.seen["2"] == 2 and fake.seen["7"] == 2  # retried once each
    assert fake.seen["3"] == 1 and fake.seen["4"] == 1  # final failures are not retried
    assert fake.seen["6"] == 2  # canceled twice: gave up after max_attempts

    labels = read_latents(sae)
    ok = {0, 1, 2, 5, 7, 8, 9, 10}
    assert set(labels) == ok
    assert labels[0]["label"] == "concept 0" and labels[0]["certainty"] == 0.9
    assert labels[0]["source"] == cfg.model and "Key words" in labels[0]["reasoning"]
    assert labels[5]["label"] == "felines" and labels[5]["certainty"] == 1.0
    assert labels[8]["certainty"] == pytest.approx(0.8)

    recs = results(sae)
    assert_no_duplicates(recs)
    final = {r["custom_id"]: r for r in recs if r.get("final")}
    assert final["3"]["status"] == "errored" and final["3"]["error"]["type"] == "invalid_request_error"
    assert final["4"]["status"] == "parse_error" and final["4"]["raw"].startswith("I am not sure")
    assert final["6"]["status"] == "canceled" and "gave up" in final["6"]["note"]
    assert {r["status"] for r in recs if not r.get("final")} == {"expired", "errored", "canceled", "missing"}
    err = capsys.readouterr().err
    assert "3 failed" in err and "latent 4: parse_error" in err

    # A rerun sends nothing and changes nothing.
    before = (sae / "latents.jsonl").read_text()
    n_batches = fake.creates
    assert run_interpret(cfg) == 3
    assert fake.creates == n_batches
    assert (sae / "latents.jsonl").read_text() == before

    # --retry-failed sends exactly the failed ones again.
    fake.script = {}
    assert run_interpret(InterpretConfig(sae=sae, retry_failed=True, **fast())) == 0
    assert sorted(fake.batches[fake.order[-1]]["params"], key=int) == ["3", "4", "6"]
    assert set(read_latents(sae)) == ok | {3, 4, 6}


def test_transient_poll_errors_and_dropped_results_stream(fake, tmp_path):
    sae = write_examples(tmp_path / "sae")
    fake.fail_retrieves = 2  # 503s while polling: retried by the SDK
    fake.cut_results_after = 4  # the connection drops after 4 result lines
    cfg = InterpretConfig(sae=sae, **fast())
    with pytest.raises(ResultsStreamError, match="rerun the same command"):
        run_interpret(cfg)
    # Lines read before the drop are kept (how many depends on the SDK's buffering).
    assert len(results(sae)) <= 4 if (sae / "interpret" / "labels.results.jsonl").exists() else True
    state = json.loads((sae / "interpret" / "labels.state.json").read_text())
    assert [b["collected"] for b in state["batches"]] == [False]
    # Rerun: the same batch is read again; lines already written are not written twice.
    assert run_interpret(cfg) == 0
    assert fake.creates == 1
    recs = results(sae)
    assert_no_duplicates(recs)
    assert len(recs) == 11
    assert set(read_latents(sae)) == set(range(11))


def _write_intent(workdir, ids):
    """The state a run killed between batches.create and its state save leaves: the intent, no batch id."""
    from interpret.batch_client import STATE_FORMAT
    from interpret.requests import now_iso

    (workdir / "labels.state.json").write_text(json.dumps({
        "format": STATE_FORMAT, "version": 1, "kind": "labels", "generation": 0, "batches": [],
        "intent": {"custom_ids": ids, "since": now_iso()}, "meta": {i: {"latent": int(i)} for i in ids}}))


def test_interrupted_create_is_adopted_not_resent(fake, tmp_path):
    """A kill between batches.create and the state save: the next run finds the batch by its intent."""
    import anthropic

    sae = write_examples(tmp_path / "sae", n_latents=4, dead=())
    ids = ["0", "1", "2", "3"]
    workdir = sae / "interpret"
    workdir.mkdir()
    # What the killed run left: its intent saved, the batch created on the server, no batch id saved.
    client = anthropic.Anthropic(api_key=KEY, base_url=fake.url)
    params = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "Latent 0."}]}
    client.messages.batches.create(requests=[{"custom_id": i, "params": dict(params, messages=[
        {"role": "user", "content": f"Latent {i}."}])} for i in ids])
    _write_intent(workdir, ids)
    assert run_interpret(InterpretConfig(sae=sae, **fast())) == 0
    assert fake.creates == 1  # adopted, not sent again
    assert set(read_latents(sae)) == {0, 1, 2, 3}
    state = json.loads((workdir / "labels.state.json").read_text())
    assert state["intent"] is None and state["batches"][0]["adopted"]


def _cli(sae: Path, fake: FakeAnthropic, *extra: str, yes: bool = True) -> subprocess.Popen:
    env = dict(os.environ, ANTHROPIC_API_KEY=KEY, ANTHROPIC_BASE_URL=fake.url, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "interpret", "interpret", "--sae", str(sae), "--poll-interval-s", "0.05",
           "--max-requests-per-batch", "4", "--count-tokens-sample", "1", *(["--yes"] if yes else []), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_kill_after_batches_created_then_resume(fake, tmp_path):
    """The real command in a subprocess, SIGKILLed while its batches are in flight, then rerun."""
    sae = write_examples(tmp_path / "sae")
    fake.hold = True
    proc = _cli(sae, fake)
    state_path = sae / "interpret" / "labels.state.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if state_path.exists() and len(json.loads(state_path.read_text())["batches"]) == 3:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        pytest.fail("the batches were not created in time")
    time.sleep(0.2)  # let it poll a little
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert fake.creates == 3 and not (sae / "latents.jsonl").exists()

    fake.hold = False
    proc = _cli(sae, fake)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert fake.creates == 3  # nothing resent
    assert Counter(fake.sent_ids()) == Counter(str(i) for i in range(11))
    assert set(read_latents(sae)) == set(range(11))  # nothing lost
    recs = results(sae)
    assert_no_duplicates(recs)
    assert len([r for r in recs if r["status"] == "ok"]) == 11
    # The key never reaches output, state, results or configs.
    assert KEY not in out + err
    for path in (sae / "interpret").iterdir():
        assert KEY not in path.read_text(errors="replace"), path
    assert KEY not in (sae / "latents.jsonl").read_text()


def test_without_terminal_needs_yes(fake, tmp_path):
    sae = write_examples(tmp_path / "sae")
    proc = _cli(sae, fake, yes=False)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "--yes" in err and "about to send" in err and "input tokens" in err
    assert fake.creates == 0 and fake.count_calls == 1


def test_missing_key_is_a_clear_error(fake, tmp_path, monkeypatch):
    sae = write_examples(tmp_path / "sae")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(SystemExit, match="ANTHROPIC_API_KEY is not set.*interpret --heuristic"):
        run_interpret(InterpretConfig(sae=sae, **fast()))
    # Scoring has no offline mode, and says so instead of naming a flag it does not have.
    from interpret.batch_client import make_client

    with pytest.raises(SystemExit, match="no offline mode") as e:
        make_client(max_retries=0, timeout_s=1, kind="score")
    assert "--heuristic" not in str(e.value)


def test_sync_mode_retries_429_and_resumes(fake, tmp_path, capsys):
    sae = write_examples(tmp_path / "sae")
    fake.fail_messages = 2
    fake.script = {"2": ["text:no json here"]}
    cfg = InterpretConfig(sae=sae, latents="0-3", sync=True, **fast())
    assert run_interpret(cfg) == 3
    assert fake.message_calls == 4 + 2 and fake.creates == 0
    assert set(read_latents(sae)) == {0, 1, 3}
    assert "parse_error" in capsys.readouterr().err
    assert run_interpret(cfg) == 3 and fake.message_calls == 6  # resumed: nothing asked again
    with pytest.raises(ValueError, match="--sync-limit"):
        run_interpret(InterpretConfig(sae=sae, sync=True, sync_limit=5, **fast()))


def test_estimate_counts_tokens_and_prices(fake, tmp_path, capsys):
    sae = write_examples(tmp_path / "sae")
    run_interpret(InterpretConfig(sae=sae, latents="0-4", count_tokens_sample=3, **{
        k: v for k, v in fast().items() if k != "count_tokens_sample"}))
    err = capsys.readouterr().err
    assert fake.count_calls == 3
    assert "count_tokens on 3 of 5 requests" in err and "$" in err
    run_interpret(InterpretConfig(sae=sae, latents="5", model="claude-unknown-9", **fast()))
    assert "no price known for 'claude-unknown-9'" in capsys.readouterr().err


def test_detection_scoring_through_batches(fake, tmp_path, capsys):
    sae = write_examples(tmp_path / "sae")
    assert run_interpret(InterpretConfig(sae=sae, **fast())) == 0
    fake.script = {"3": ['text:<analysis>everything</analysis> {"answers": ' + json.dumps([1] * 10) + "}"],
                   "4": ["text:cannot tell"]}
    cfg = ScoreConfig(sae=sae, n_active=5, n_random=5, **fast())
    assert run_score(cfg) == 3
    lat = read_latents(sae)
    assert lat[0]["scores"]["detection"]["balanced_accuracy"] == 1.0
    assert lat[3]["scores"]["detection"]["balanced_accuracy"] == 0.5
    assert lat[3]["scores"]["detection"]["tpr"] == 1.0 and lat[3]["scores"]["detection"]["tnr"] == 0.0
    assert "detection" not in lat[4]["scores"]
    png = sae / "interpret" / "detection_scores.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr()
    assert "balanced accuracy" in out.out and "latent 4: parse_error" in out.err
    # The hidden truth of each question is what the reply is scored against.
    recs = {r["custom_id"]: r for r in results(sae, "score") if r["status"] == "ok"}
    docs, truth = recs["0"]["docs"], recs["0"]["truth"]
    assert truth == [int(d % 1000 < 500) for d in docs] and sum(truth) == 5

    # Rerun: nothing sent. Relabel one latent: only it is scored again, its old score dropped.
    n = fake.creates
    assert run_score(cfg) == 3 and fake.creates == n
    entries = read_latents(sae)
    entries[0]["label"] = "a new label"
    from interpret.records import write_latents
    write_latents(sae, entries)
    assert run_score(cfg) == 3
    assert fake.creates == n + 1 and list(fake.batches[fake.order[-1]]["params"]) == ["0"]
    assert read_latents(sae)[0]["scores"]["detection"]["balanced_accuracy"] == 1.0


def test_retry_failed_retries_only_the_old_failures_within_the_attempt_limit(fake, tmp_path):
    """A request that always fails is tried max_attempts times per --retry-failed run, and the run ends."""
    sae = write_examples(tmp_path / "sae", n_latents=4, dead=())
    fake.script = {"2": ["errored:overloaded_error"], "3": ["errored:invalid_request_error"]}
    assert run_interpret(InterpretConfig(sae=sae, max_attempts=2, **fast())) == 3
    assert fake.seen["2"] == 2 and fake.seen["3"] == 1
    creates = fake.creates
    assert run_interpret(InterpretConfig(sae=sae, max_attempts=2, retry_failed=True, **fast())) == 3
    assert fake.seen["2"] == 4 and fake.seen["3"] == 2  # a fresh max_attempts each, then it stops
    assert fake.creates - creates == 2
    assert set(read_latents(sae)) == {0, 1}


def test_a_foreign_batch_of_the_same_size_is_never_adopted(fake, tmp_path):
    """After a kill between create and save, only a batch whose results are exactly our custom_ids is ours."""
    import anthropic

    sae = write_examples(tmp_path / "sae", n_latents=4, dead=())
    ids = ["0", "1", "2", "3"]
    workdir = sae / "interpret"
    workdir.mkdir()
    client = anthropic.Anthropic(api_key=KEY, base_url=fake.url)
    params = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "Latent 0."}]}
    # Someone else's batch, created after our intent, with as many requests: not ours (and never created).
    _write_intent(workdir, ids)
    client.messages.batches.create(requests=[{"custom_id": f"other-{i}", "params": params} for i in ids])
    assert run_interpret(InterpretConfig(sae=sae, **fast())) == 0
    assert fake.creates == 2  # the foreign one, and ours sent for real
    state = json.loads((workdir / "labels.state.json").read_text())
    assert not any(b.get("adopted") for b in state["batches"])
    assert set(read_latents(sae)) == {0, 1, 2, 3}


def test_a_malformed_results_line_is_that_items_failure(fake, tmp_path):
    sae = write_examples(tmp_path / "sae", n_latents=5, dead=())
    fake.malformed = {"2"}
    assert run_interpret(InterpretConfig(sae=sae, **fast())) == 3  # finished, with one failure
    recs = results(sae)
    bad = [r for r in recs if r["custom_id"] == "2"]
    assert len(bad) == 1 and bad[0]["status"] == "malformed_result" and bad[0]["raw"].startswith('{"custom_id": "2"')
    assert set(read_latents(sae)) == {0, 1, 3, 4}
    fake.malformed = set()
    assert run_interpret(InterpretConfig(sae=sae, retry_failed=True, **fast())) == 0  # and it can be retried
    assert set(read_latents(sae)) == {0, 1, 2, 3, 4}


def test_steer_eval_judge_rates_each_completion_through_the_batch_client(fake, tmp_path):
    """The LLM judge of ``llama3-sae steer-eval``: one request per completion, the rating parsed from the
    reply, a reply without a rating a parse failure, mean rating per condition; a rerun asks nothing again."""
    from rich.console import Console

    from apps.steer_eval import SteerEvalConfig, judge

    report = {"concept": "astronomy", "results": [{"completions": ["Stars and planets.", "Soup."]},
                                                   {"completions": ["A comet passed.", "Tea."]}]}
    fake.script = {"0-0": ["text:2"], "0-1": ["text:0"], "1-0": ["text:Rating: 1"], "1-1": ["text:no idea"]}
    cfg = SteerEvalConfig(sae=tmp_path, judge=True, yes=True)
    judge(report, cfg, tmp_path / "out", Console(stderr=True))
    r0, r1 = report["results"]
    assert (r0["judge_mean"], r0["judge_rated"]) == (1.0, 2) and (r1["judge_mean"], r1["judge_rated"]) == (1.0, 1)
    assert any(x.get("status") == "parse_error" for x in results(tmp_path / "out", "judge"))
    asked = fake.create_calls + fake.message_calls
    judge(report, cfg, tmp_path / "out", Console(stderr=True))
    assert fake.create_calls + fake.message_calls == asked  # resumed from the results file
