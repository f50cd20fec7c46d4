"""Capture end to end: activations against HF transformers, the CLI path, stopping after the deepest site,
chats, resume after SIGKILL, and a 2-rank torchrun capture against a one-process capture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import LLAMA3_TOKENIZER_PATH, make_random_model, to_hf_model, write_meta_checkpoint
from capture.cli import main_capture
from capture.store import ActivationStore
from llama3.args import ModelArgs
from llama3.checkpoint import load_model
from llama3.tokenizer import ChatFormat, Tokenizer

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(LLAMA3_TOKENIZER_PATH is None, reason="needs llama-models' tokenizer.model")]

REPO = Path(__file__).resolve().parent.parent
SENTENCES = REPO / "capture" / "data" / "sentences.txt"
ALL_POINTS = "L0RP,L0AI,L1A,L1RM,L2MI,L2M,L2R"  # every point, at several layers; layer 3 is never run


def _args() -> ModelArgs:
    # The real 128,256-token vocabulary (the real tokenizer), tiny widths.
    return ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=128256,
                     rope_scaling_factor=32.0, tie_word_embeddings=True, max_seq_len=256)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model = make_random_model(_args(), seed=3, std=0.1, norm_jitter=0.2)
    return write_meta_checkpoint(model, tmp_path_factory.mktemp("ckpt"), tokenizer_path=LLAMA3_TOKENIZER_PATH)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(LLAMA3_TOKENIZER_PATH)


def _capture(ckpt: Path, out: Path, *extra: str, data: Path = SENTENCES, sites: str = "L1R,L2A") -> None:
    argv = ["--ckpt-dir", str(ckpt), "--data", str(data), "--sites", sites, "--out", str(out),
            "--no-progress", *extra]
    assert main_capture(argv) == 0


def _by_doc(rows: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for d in rows["doc_ids"].unique().tolist():
        m = rows["doc_ids"] == d
        out[d] = {k: v[m] for k, v in rows.items()}
    return out


def _hf_sites(hf, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Module outputs of the HF twin at our sites, from forward hooks; [T, d] each."""
    got: dict[str, torch.Tensor] = {}
    hooks = []
    layers = hf.model.layers

    def keep(name, pre=False):
        def hook(module, args, kwargs_or_out, out=None):
            value = (args[0] if args else kwargs_or_out["hidden_states"]) if pre else kwargs_or_out
            got[name] = (value[0] if isinstance(value, tuple) else value)[0].detach()
        return hook

    hooks.append(layers[0].register_forward_pre_hook(keep("L0RP", pre=True), with_kwargs=True))
    hooks.append(layers[0].input_layernorm.register_forward_hook(keep("L0AI")))
    hooks.append(layers[1].self_attn.register_forward_hook(keep("L1A")))
    hooks.append(layers[1].register_forward_pre_hook(keep("L1in", pre=True), with_kwargs=True))
    hooks.append(layers[2].post_attention_layernorm.register_forward_hook(keep("L2MI")))
    hooks.append(layers[2].mlp.register_forward_hook(keep("L2M")))
    hooks.append(layers[2].register_forward_hook(keep("L2R")))
    try:
        with torch.no_grad():
            hf.model(tokens[None])  # the decoder stack only; the 128k-vocabulary head is not needed
    finally:
        for h in hooks:
            h.remove()
    got["L1RM"] = got.pop("L1in") + got["L1A"]  # resid_mid = block input + attention output
    return got


def test_activations_match_hf_at_every_point(ckpt, tokenizer, tmp_path):
    """Rows stored through the CLI (length-bucketed, right-padded batches) equal the HF twin's module
    outputs computed one document at a time, at all seven hook points."""
    out = tmp_path / "acts"
    _capture(ckpt, out, "--limit", "32", "--dtype", "fp32", "--model-dtype", "fp32", "--bos", "--store-first-token",
             "--tokens-per-batch", "400", "--bucket-tokens", "300", sites=ALL_POINTS)
    hf = to_hf_model(load_model(ckpt, dtype=torch.float32))
    texts = SENTENCES.read_text().splitlines()[:32]
    stores = {s: ActivationStore(out / s) for s in ALL_POINTS.split(",")}
    per_site = {s: _by_doc(st.read_all(verify=True)) for s, st in stores.items()}
    assert sorted(per_site["L2R"]) == list(range(32))
    worst = 0.0
    for doc_id, text in enumerate(texts):
        ids = torch.tensor(tokenizer.encode(text, bos=True, eos=False))
        ref = _hf_sites(hf, ids)
        for s in stores:
            rows = per_site[s][doc_id]
            assert torch.equal(rows["tokens"].long(), ids)
            assert torch.equal(rows["positions"].long(), torch.arange(len(ids)))
            err = (rows["activations"] - ref[s]).abs().max().item() / ref[s].abs().max().item()
            worst = max(worst, err)
    assert worst < 1e-5, worst
    m = stores["L2R"].manifest
    assert m.format == "llama3-sae-activations" and m.version == 1 and m.d_model == 64
    assert m.dtype == "float32" and m.site == "L2R" and m.num_docs == 32
    assert m.num_rows == sum(len(tokenizer.encode(t, bos=True, eos=False)) for t in texts)


def test_forward_stops_after_deepest_site_and_progress_is_shown(ckpt, tokenizer, tmp_path):
    import io

    from rich.console import Console

    from capture.capture import run_capture
    from capture.config import CaptureConfig

    model = load_model(ckpt, dtype=torch.float32)

    def boom(*_):
        raise AssertionError("layer 2 ran, but the deepest site is in layer 1")

    model.layers[2].register_forward_pre_hook(boom)
    cfg = CaptureConfig(ckpt_dir=ckpt, data=(SENTENCES,), sites="L1R,L0A", out=tmp_path / "o", limit=10,
                        dtype="fp16")
    screen = io.StringIO()
    summary = run_capture(cfg, model=model, tokenizer=tokenizer, console=Console(file=screen, width=160))
    store = ActivationStore(tmp_path / "o" / "L1R")
    assert summary.docs == 10 and store.num_rows == summary.rows > 0
    assert store.manifest.dtype == "float16" and store.read_shard(0)["activations"].dtype == torch.float16
    shown = screen.getvalue()
    assert "capture L1R,L0A" in shown and "10/10 docs" in shown and "tok/s" in shown


def test_bos_row_left_out_and_truncation_counted(ckpt, tokenizer, tmp_path, capsys):
    out = tmp_path / "acts"
    _capture(ckpt, out, "--limit", "30", "--bos", "--max-tokens", "8", sites="L1R")
    printed = capsys.readouterr().out
    assert f"next: statistics and a shuffled copy for training, per store: llama3-sae preprocess --store {out / 'L1R'}" \
        in printed
    store = ActivationStore(out / "L1R")
    rows = store.read_all()
    texts = SENTENCES.read_text().splitlines()[:30]
    lengths = [len(tokenizer.encode(t, bos=True, eos=False)) for t in texts]
    n_cut = sum(n > 8 for n in lengths)
    assert n_cut > 0
    # BOS rows are left out: positions start at 1, and every kept document keeps min(n, 8) - 1 rows.
    assert rows["positions"].min() == 1 and store.num_rows == sum(min(n, 8) - 1 for n in lengths)
    assert (rows["tokens"] != tokenizer.bos_id).all()
    c = store.manifest.counters
    assert c["truncated_docs"] == n_cut and c["truncated_tokens"] == sum(max(n - 8, 0) for n in lengths)
    assert c["bos_rows_left_out"] == 30
    assert f"{n_cut:,} documents lost" in printed and "first-token rows not stored (attention sinks): 30" in printed


def test_chat_dataset_rendered_with_chat_format(ckpt, tokenizer, tmp_path):
    chats = [
        [{"role": "user", "content": "Where is the UN headquarters?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello. How can I help?"}],
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in chats) + "\n{\"messages\": 3}\n")
    out = tmp_path / "acts"
    _capture(ckpt, out, "--chat", "--store-first-token", data=data, sites="L0R")
    rows = _by_doc(ActivationStore(out / "L0R").read_all())
    fmt = ChatFormat(tokenizer)
    assert rows[0]["tokens"].tolist() == fmt.encode_dialog_prompt(chats[0])  # ends with an open assistant header
    complete = [tokenizer.bos_id] + [t for m in chats[1] for t in fmt.encode_message(m)]
    assert rows[1]["tokens"].tolist() == complete
    manifest = ActivationStore(out / "L0R").manifest
    assert manifest.num_docs == 2


def test_rerun_is_noop_and_other_options_are_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "acts"
    _capture(ckpt, out, "--limit", "5", sites="L0R")
    shard = ActivationStore(out / "L0R").shard_path(0)
    before = (shard.stat().st_mtime_ns, ActivationStore(out / "L0R").manifest)
    capsys.readouterr()
    _capture(ckpt, out, "--limit", "5", sites="L0R")
    assert "already complete" in capsys.readouterr().out
    assert (shard.stat().st_mtime_ns, ActivationStore(out / "L0R").manifest) == before
    argv = ["--ckpt-dir", str(ckpt), "--data", str(SENTENCES), "--sites", "L0R", "--out", str(out), "--limit", "6",
            "--no-progress"]
    assert main_capture(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a capture with other options" in err and "limit: 5 -> 6" in err


def test_user_errors_are_reported(ckpt, tmp_path, capsys):
    base = ["--ckpt-dir", str(ckpt), "--data", str(SENTENCES), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main_capture(base + ["--sites", "L9R"]) == 2
    assert "past the last layer" in capsys.readouterr().err
    assert main_capture(base + ["--sites", "L1Q"]) == 2
    assert "unknown site code" in capsys.readouterr().err
    assert main_capture(["--ckpt-dir", str(ckpt), "--data", str(tmp_path / "missing.txt"), "--sites", "L0R",
                         "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    # The failed attempts left nothing that blocks a corrected command.
    assert main_capture(base + ["--sites", "L0R", "--limit", "3"]) == 0


# --------------------------------------------------------------------------- kill and resume
def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group (workers too) is killed."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:6]} timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _big_text(tmp_path: Path, copies: int) -> Path:
    lines = SENTENCES.read_text().splitlines()
    path = tmp_path / "many.txt"
    path.write_text("\n".join(f"{i}: {line}" for i in range(copies) for line in lines) + "\n")
    return path


def _read_sorted(store_dir: Path) -> dict[str, torch.Tensor]:
    rows = ActivationStore(store_dir).read_all(verify=True)
    key = rows["doc_ids"] * 1000 + rows["positions"].long()
    order = torch.argsort(key)
    assert torch.unique(key).numel() == key.numel(), "a (doc_id, position) row is stored twice"
    return {k: v[order] for k, v in rows.items()}


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(ckpt, tmp_path):
    data = _big_text(tmp_path, copies=2)
    # Small windows, each closing a shard: many commit points to be killed between.
    opts = ["--ckpt-dir", str(ckpt), "--data", str(data), "--sites", "L1R,L0M", "--no-progress",
            "--bucket-tokens", "400", "--shard-mb", "0.02", "--tokens-per-batch", "256"]
    ref = tmp_path / "ref"
    assert main_capture(opts + ["--out", str(ref)]) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "capture", *opts, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = out / ".capture" / "progress-r0of1.json"
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(progress.read_text())["docs_done"]
        except (FileNotFoundError, json.JSONDecodeError):
            done = 0
        if done >= 80:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the capture ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = len(data.read_text().splitlines())
    assert 80 <= done < total
    assert not (out / "L1R" / "manifest.json").exists()

    resumed = _run(cmd, env)
    assert resumed.returncode == 0, resumed.stderr
    assert "capture resumed" in resumed.stdout
    # Only what was not committed was computed again.
    total_tokens = ActivationStore(ref / "L1R").manifest.num_tokens
    redone = int(resumed.stdout.split(" tokens this run")[0].split()[-1].replace(",", ""))
    assert redone < total_tokens
    for site in ("L1R", "L0M"):
        a, b = _read_sorted(ref / site), _read_sorted(out / site)
        for k in a:
            assert torch.equal(a[k], b[k]), (site, k)
        assert b["doc_ids"].unique().numel() == total
        # Same shard boundaries too: the resumed run cuts the same windows.
        assert [s["rows"] for s in ActivationStore(ref / site).shards] == \
               [s["rows"] for s in ActivationStore(out / site).shards]
    assert not (out / ".capture").exists() and not (out / "L1R" / ".parts").exists()


def test_killed_finalisation_is_finished_by_the_next_run(ckpt, tokenizer, tmp_path, monkeypatch):
    import capture.capture as cap

    opts = ["--limit", "24", "--shard-mb", "0.01", "--bucket-tokens", "80"]
    _capture(ckpt, tmp_path / "ref", *opts, sites="L0R,L1A")
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        # Renames in this process: run.json, finalize.json, then the shard moves. Die after two moves.
        calls.append(Path(dst).name)
        if len(calls) == 5:
            raise KeyboardInterrupt  # stands in for a kill between two renames
        real_replace(src, dst)

    monkeypatch.setattr(cap.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _capture(ckpt, tmp_path / "out", *opts, sites="L0R,L1A")
    monkeypatch.setattr(cap.os, "replace", real_replace)
    assert calls[:2] == ["run.json", "finalize.json"] and calls[2].startswith("shard-")
    assert (tmp_path / "out" / ".capture" / "finalize.json").is_file()
    _capture(ckpt, tmp_path / "out", *opts, sites="L0R,L1A")
    for site in ("L0R", "L1A"):
        a, b = ActivationStore(tmp_path / "ref" / site), ActivationStore(tmp_path / "out" / site)
        assert len(a.shards) == len(b.shards) > 2
        ra, rb = a.read_all(verify=True), b.read_all(verify=True)
        assert all(torch.equal(ra[k], rb[k]) for k in ra)


# --------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_two_gloo_ranks_union_equals_one_process(ckpt, tmp_path):
    opts = ["--ckpt-dir", str(ckpt), "--data", str(SENTENCES), "--sites", "L1R", "--no-progress",
            "--dtype", "fp32", "--model-dtype", "fp32", "--limit", "101", "--bucket-tokens", "400",
            "--shard-mb", "0.05", "--shuffle-buffer", "64", "--seed", "7"]
    one = tmp_path / "one"
    assert main_capture(opts + ["--out", str(one)]) == 0
    two = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "capture", *opts, "--out", str(two)]
    res = _run(cmd, env)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = ActivationStore(two / "L1R").manifest
    assert manifest.world_size == 2 and {s["rank"] for s in manifest.shards} == {0, 1}
    # Each rank's shards hold only its own documents (doc_id mod 2), and together all of them once.
    store = ActivationStore(two / "L1R")
    for i, entry in enumerate(store.shards):
        assert (store.read_shard(i)["doc_ids"] % 2 == entry["rank"]).all()
    a, b = _read_sorted(one / "L1R"), _read_sorted(two / "L1R")
    for k in ("tokens", "doc_ids", "positions"):
        assert torch.equal(a[k], b[k]), k
    assert a["doc_ids"].unique().tolist() == list(range(101))
    # Different batch shapes on the two sides: equal up to fp32 rounding.
    torch.testing.assert_close(a["activations"], b["activations"], rtol=1e-4, atol=1e-5)
    assert manifest.num_rows == ActivationStore(one / "L1R").num_rows


def test_out_inside_an_existing_store_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "acts"
    _capture(ckpt, out, "--limit", "4", sites="L1R")
    nested = out / "L1R" / "more"
    argv = ["--ckpt-dir", str(ckpt), "--data", str(SENTENCES), "--sites", "L1R", "--out", str(nested), "--limit", "4",
            "--no-progress"]
    assert main_capture(argv) == 2
    assert f"is inside the activation store {out / 'L1R'}" in capsys.readouterr().err
    assert not nested.exists()


def test_resume_refuses_a_checkpoint_replaced_in_place(ckpt, tmp_path, capsys):
    """The run records the checkpoint's files (size, mtime), not just its path."""
    import shutil

    from capture.runstate import _start_run, decide
    from capture.config import CaptureConfig

    model = tmp_path / "model"
    shutil.copytree(ckpt, model)
    out = tmp_path / "acts"
    cfg = CaptureConfig(ckpt_dir=model, data=(SENTENCES,), sites="L1R", out=out, bos=False, progress=False)
    state = out / ".capture"
    _start_run(state / "run.json", cfg, 1)
    (state / "progress-r0of1.json").write_text(json.dumps({"docs_done": 8}))  # something was committed
    assert decide(cfg, ["L1R"], 1) == ("capture", "")
    weights = model / "consolidated.00.pth"
    weights.write_bytes(weights.read_bytes())  # rewritten: a new modification time
    kind, message = decide(cfg, ["L1R"], 1)
    assert kind == "error" and f"the checkpoint {model} changed since the unfinished capture" in message


def test_a_full_disk_is_one_line_and_the_capture_resumes(ckpt, tmp_path):
    """A real full disk: a small tmpfs (needs root, as CI and these machines have), grown afterwards."""
    from helpers import remount, small_tmpfs

    with small_tmpfs(tmp_path / "disk", "128k") as disk:
        out = disk / "acts"
        cmd = [sys.executable, "-m", "capture", "--ckpt-dir", str(ckpt), "--data", str(SENTENCES), "--sites", "L1R",
               "--out", str(out), "--limit", "200", "--no-progress", "--shard-mb", "0.05", "--dtype", "fp32"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        full = _run(cmd, env)
        assert full.returncode == 2, full.stderr
        assert "Traceback" not in full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert "cannot write" in last and str(out) in last and "no space left" in last
        remount(disk, "size=64m")  # the space is freed
        ok = _run(cmd, env)
        assert ok.returncode == 0, ok.stderr
        assert ActivationStore(out / "L1R").manifest.num_docs == 200
