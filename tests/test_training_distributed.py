"""Several processes on CPU (gloo): DDP through ``torchrun -m training`` equals one process on the same
global batch, and the latent-sharded SAE (DeviceMesh / DTensor, global TopK) equals the unsharded one."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from training import checkpoint as ckpt
from training.cli import main_train
from training.config import TrainConfig
from training.data import TrainStream
from llama3_sae.dist import DistContext
from training.logging import read_metrics
from training.loop import Trainer
from training.synthetic import sparse_dictionary_data, write_store

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
D, N_LATENTS = 16, 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, _ = sparse_dictionary_data(4000, D, 48, 3, noise=0.02, seed=2)
    return write_store(tmp_path_factory.mktemp("store") / "L0R", x * 2 + 0.3, shard_rows=900, dtype=torch.bfloat16)


def _argv(store, out, batch, **kw):
    base = {"n_latents": N_LATENTS, "k": 4, "k_aux": 8, "batch_size": batch, "steps": 12, "lr": 3e-3,
            "warmup_steps": 2, "dead_after_tokens": 10**9, "log_every": 3, "val_every": 6, "checkpoint_every": 100,
            "val_fraction": 0.05, "prefetch": 1}
    base.update(kw)
    argv = ["--store", str(store), "--out", str(out), "--no-progress", "--no-plots"]
    for k, v in base.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    # The environment torchrun would give each process; main_train then takes the same path.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    rc = main_train(argv)
    if rc != 0:
        raise SystemExit(f"rank {rank}: main_train returned {rc}")


def _spawn(world: int, argv: list[str]) -> None:
    mp.start_processes(_worker, args=(world, _free_port(), argv), nprocs=world, start_method="spawn")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "sae.safetensors")


def _assert_close_weights(a: dict, b: dict, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _losses(out: Path) -> list[float]:
    return [r["mse"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.slow
def test_torchrun_ddp_equals_one_process_on_the_same_global_batch(store, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main_train(_argv(store, single, batch=64)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "training", *_argv(store, ddp, batch=32)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) = 2 data x 1 model parallel" in proc.stderr
    _assert_close_weights(_weights(ddp), _weights(single))
    assert _losses(ddp) == pytest.approx(_losses(single), rel=1e-5)
    # Dead-latent counters agree too (MIN all-reduce of tokens since the last firing).
    t_ddp, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(ddp / "checkpoints"))
    t_one, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(single / "checkpoints"))
    assert torch.equal(t_ddp["tracker.tokens_since_fired"], t_one["tracker.tokens_since_fired"])
    val_ddp = json.loads((ddp / "metrics_summary.json").read_text())["val"]
    val_one = json.loads((single / "metrics_summary.json").read_text())["val"]
    assert val_ddp["rows"] == val_one["rows"]
    assert val_ddp["explained_variance"] == pytest.approx(val_one["explained_variance"], rel=1e-5)
    # The same --out with other options: refused, and said once for the job, not once per rank.
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "training", *_argv(store, ddp, batch=32, k=8)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert again.stderr.count("python -m training: error:") == 1 and "different options (k: 4 -> 8" in again.stderr

    # The test can fail: a rank that trains on its own half of each batch (the original project's
    # bypassed DDP) ends far from the all-reduced result.
    cfg = TrainConfig(**{**json.loads((single / "train_config.json").read_text()), "out": tmp_path / "bug",
                         "batch_size": 32, "resume": True})
    bug = Trainer(cfg, DistContext())
    bug.stream = TrainStream(bug.rows, batch_size=32, data_parallel=2, dp_rank=0, seed=cfg.seed)
    bug.total_steps = 12
    bug.run()
    diff = (_weights(tmp_path / "bug")["W_enc"] - _weights(single)["W_enc"]).abs().max()
    assert diff > 1e-3


@pytest.mark.slow
def test_latent_sharded_sae_equals_the_unsharded_one(store, tmp_path):
    # A latent silent for one step's tokens is dead, so the aux-k loss (also a global top-k) runs.
    kw = {"dead_after_tokens": 64, "steps": 14}
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main_train(_argv(store, single, batch=64, **kw)) == 0
    _spawn(2, _argv(store, sharded, batch=64, model_parallel=2, **kw))
    records = read_metrics(sharded / "metrics.jsonl")
    assert any(r.get("aux_loss", 0) > 0 for r in records), "the aux-k path was not exercised"
    assert _losses(sharded) == pytest.approx(_losses(single), rel=1e-5)
    a = [r.get("aux_loss") for r in read_metrics(single / "metrics.jsonl") if r["split"] == "train"]
    b = [r.get("aux_loss") for r in records if r["split"] == "train"]
    assert b == pytest.approx(a, rel=1e-4, abs=1e-7)
    _assert_close_weights(_weights(sharded), _weights(single))
    # The checkpoint holds whole tensors under the unsharded names: optimizer moments match too.
    t_sh, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(sharded / "checkpoints"))
    t_one, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(single / "checkpoints"))
    assert t_sh.keys() == t_one.keys()
    for k in t_one:
        if k.startswith(("optim.", "tracker.")):
            torch.testing.assert_close(t_sh[k], t_one[k], rtol=1e-4, atol=1e-8, msg=k)
    val_sh = json.loads((sharded / "metrics_summary.json").read_text())["val"]
    val_one = json.loads((single / "metrics_summary.json").read_text())["val"]
    for key in ("l0", "explained_variance", "dead_fraction", "mse"):
        assert val_sh[key] == pytest.approx(val_one[key], rel=1e-5, abs=1e-7), key



@pytest.mark.slow
def test_mesh_2x2_resumes_a_one_process_checkpoint_and_ends_equal(store, tmp_path):
    """2 data x 2 model parallel ranks (gradients averaged over "data", latents split over "model")
    continue a one-process run from its step-4 checkpoint. Checkpoints hold whole tensors under the
    unsharded names, so they do not depend on the layout; the result equals the uninterrupted run."""
    single, mesh = tmp_path / "single", tmp_path / "mesh"
    # Log windows of 2 steps line up with the checkpoint, so the resumed run logs the same windows.
    assert main_train(_argv(store, single, batch=64, steps=8, checkpoint_every=4, log_every=2)) == 0
    shutil.copytree(single, mesh)
    shutil.rmtree(mesh / "checkpoints" / "step-000000008")
    (mesh / "sae.safetensors").unlink()
    _spawn(4, _argv(store, mesh, batch=32, model_parallel=2, steps=8, checkpoint_every=4, log_every=2))
    assert json.loads((mesh / "metrics_summary.json").read_text())["resumed_from_step"] == 4
    _assert_close_weights(_weights(mesh), _weights(single))
    assert _losses(mesh) == pytest.approx(_losses(single), rel=1e-5)
    t_mesh, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(mesh / "checkpoints"))
    t_one, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(single / "checkpoints"))
    for k in t_one:
        if k.startswith(("optim.", "tracker.", "model.")):
            torch.testing.assert_close(t_mesh[k], t_one[k], rtol=1e-4, atol=1e-7, msg=k)
