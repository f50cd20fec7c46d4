"""A training process killed with SIGKILL and started again with the same command ends bitwise equal to
a run that was never interrupted: weights, optimizer moments, dead-latent counters and the metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint as ckpt
from training.logging import read_metrics
from training.synthetic import sparse_dictionary_data, write_store

REPO = Path(__file__).resolve().parents[1]
STEPS = 240


def _argv(store: Path, out: Path) -> list[str]:
    return ["--store", str(store), "--out", str(out), "--n-latents", "512", "--k", "8", "--k-aux", "32",
            "--batch-size", "256", "--steps", str(STEPS), "--lr", "2e-3", "--warmup-steps", "10",
            "--dead-after-tokens", "2048", "--ema-decay", "0.95", "--k-anneal-start", "32", "--k-anneal-steps", "50",
            "--checkpoint-every", "20", "--keep-checkpoints", "2", "--log-every", "10", "--val-every", "40",
            "--no-progress", "--no-plots"]


def _run(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "training", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    x, _ = sparse_dictionary_data(30_000, 64, 256, 4, noise=0.02, seed=3)
    store = write_store(tmp_path / "store", x, shard_rows=7000, dtype=torch.bfloat16)
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    reference = _run(_argv(store, whole))  # runs alongside the run that gets killed
    victim = _run(_argv(store, killed))
    root = killed / "checkpoints"
    deadline = time.monotonic() + 240
    # Kill once two checkpoints exist, i.e. somewhere after step 40 and before the end.
    while len(ckpt.list_checkpoints(root)) < 2 or ckpt.list_checkpoints(root)[-1][0] < 40:
        assert victim.poll() is None, "the run ended before it could be killed:\n" + victim.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.02)
    time.sleep(0.3)  # land somewhere between checkpoints (maybe in the middle of writing one)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    step_at_kill = ckpt.list_checkpoints(root)[-1][0]
    assert step_at_kill < STEPS and not (killed / "sae.safetensors").exists()

    resumed = _run(_argv(store, killed))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"(step {step_at_kill})" in " ".join(out.split())
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    a, b = load_file(whole / "sae.safetensors"), load_file(killed / "sae.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming"
    ta, ma = ckpt.load_checkpoint(ckpt.latest_checkpoint(whole / "checkpoints"))
    tb, mb = ckpt.load_checkpoint(ckpt.latest_checkpoint(killed / "checkpoints"))
    assert ma["step"] == mb["step"] == STEPS and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"checkpoint tensor {k} differs after resuming"
    assert ma["scheduler"] == mb["scheduler"]

    # Metrics: the same records, none doubled (timings aside).
    timing = {"tokens_per_s", "eta_s", "elapsed_s"}
    ra = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(whole / "metrics.jsonl")]
    rb = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(killed / "metrics.jsonl")]
    assert ra == rb
