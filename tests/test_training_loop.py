"""The training loop in one process, end to end through ``main_train``: outputs, the schedule stepped
every step, k-annealing, b_pre and normalisation from the store statistics, validation against
``sae.metrics``, EMA, bf16 autocast, JumpReLU conversion, checkpoints and resume decisions."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae import KSchedule, SparseAutoencoder, load_sae
from sae.metrics import evaluate_reconstruction
from training import checkpoint as ckpt
from training.cli import main_train
from training.config import TrainConfig
from training.data import StoreRows, val_batches
from llama3_sae.dist import DistContext
from training.logging import read_metrics, truncate_metrics
from training.loop import Trainer
from training.schedule import lr_factor
from training.synthetic import sparse_dictionary_data, write_store

pytestmark = pytest.mark.usefixtures("one_thread")

D, N_LATENTS = 16, 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, _ = sparse_dictionary_data(3000, D, 48, 3, noise=0.02, seed=1)
    x = x * 3 + 0.5  # a mean and a scale, so b_pre and the normalisation have something to do
    return write_store(tmp_path_factory.mktemp("store") / "L0R", x, shard_rows=700, dtype=torch.bfloat16)


def _args(store, out, **kw):
    base = dict(n_latents=N_LATENTS, k=4, k_aux=8, batch_size=64, steps=30, lr=3e-3, warmup_steps=5,
                dead_after_tokens=640, log_every=5, val_every=10, checkpoint_every=10, keep_checkpoints=2,
                val_fraction=0.05)
    base.update(kw)
    argv = ["--store", str(store), "--out", str(out), "--no-progress"]
    for k, v in base.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is False:
            argv.append("--no-" + k.replace("_", "-"))
        else:
            argv += [flag, str(v)]
    return argv


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sae"
    assert main_train(_args(store, out, jumprelu=True, jumprelu_rows=1000)) == 0
    return out


def test_outputs_of_a_run(trained, store):
    sae = load_sae(trained)
    assert sae.cfg.d_model == D and sae.cfg.n_latents == N_LATENTS and sae.cfg.site == "L0R"
    assert sae.cfg.model_name == "synthetic" and sae.cfg.normalization == "dataset"
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N_LATENTS), rtol=0, atol=1e-5)
    saved = TrainConfig(**{**json.loads((trained / "train_config.json").read_text())})
    assert saved.n_latents == N_LATENTS and saved.steps == 30
    records = read_metrics(trained / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for key in ("mse", "aux_loss", "l0", "explained_variance", "dead_fraction", "lr", "tokens_per_s", "eta_s"):
        assert key in train[-1]
    assert train[-1]["mse"] < train[0]["mse"]
    assert [r["step"] for r in records if r["split"] == "val"] == [10, 20, 30]
    assert [p.name for p in (trained / "checkpoints").iterdir()] and \
        sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-000000020", "step-000000030"]
    assert (trained / "plots" / "training_curves.png").stat().st_size > 10_000
    summary = json.loads((trained / "metrics_summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 64

    # The final validation equals sae.metrics on the held-out rows with the saved SAE.
    rows = StoreRows(store, val_fraction=0.05, val_max_rows=65536, seed=0)
    ref = evaluate_reconstruction(sae, val_batches(rows, 64))
    assert summary["val"]["rows"] == ref.n_tokens == len(rows.val_ids)
    for key in ("l0", "explained_variance", "dead_fraction", "dense_fraction"):
        assert summary["val"][key] == pytest.approx(getattr(ref, key), rel=1e-5, abs=1e-6), key
    assert summary["val"]["mse_raw"] == pytest.approx(ref.mse, rel=1e-4)

    # JumpReLU conversion: same L0 on the rows it was fitted on, scored on held-out rows.
    jump = load_sae(trained / "jumprelu")
    assert jump.cfg.architecture == "jumprelu"
    assert summary["jumprelu"]["l0"] == pytest.approx(4.0, abs=1.0)


def test_lr_schedule_steps_every_step_and_k_anneals(store, tmp_path):
    out = tmp_path / "sae"
    assert main_train(_args(store, out, steps=24, warmup_steps=4, log_every=1, val_every=0, lr=1e-3,
                            k_anneal_start=16, k_anneal_steps=10, plots=False)) == 0
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    lrs = [r["lr"] for r in train]  # the lr each step used
    # Reference: linear warm-up over 4 steps, then a cosine from 1e-3 to 2e-4 ending at the last step.
    ref = [1e-3 * (s + 1) / 4 if s < 4 else 2e-4 + 0.8e-3 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 19))
           for s in range(24)]
    np.testing.assert_allclose(lrs, ref, rtol=1e-6)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # changes every step, not once per epoch
    schedule = KSchedule(k=4, k_start=16, anneal_steps=10)
    assert [r["k"] for r in train] == [schedule(s) for s in range(24)]
    assert train[0]["k"] == 16 and train[-1]["k"] == 4
    assert all(r["l0"] <= r["k"] + 1e-6 for r in train)
    assert lr_factor(0, warmup=0, total=5, final_ratio=0.2) == 1.0
    assert lr_factor(4, warmup=0, total=5, final_ratio=0.2) == pytest.approx(0.2)


def test_b_pre_and_normalisation_come_from_the_store_statistics(store, tmp_path):
    stats = StoreRows(store, val_fraction=0.05, val_max_rows=100, seed=0).stats
    for norm in ("dataset", "none"):
        cfg = TrainConfig(store=store, out=tmp_path / norm, n_latents=N_LATENTS, k=4, normalization=norm, steps=1)
        t = Trainer(cfg, DistContext())
        scale = math.sqrt(D) / float(stats["mean_norm"][0]) if norm == "dataset" else 1.0
        torch.testing.assert_close(t.sae.b_pre.detach().double(), stats["mean"] * scale, rtol=1e-6, atol=1e-6)
        if norm == "dataset":
            assert float(t.sae.norm_in_scale) == pytest.approx(scale, rel=1e-6)
    # Per-token normalisation: b_pre is the mean of the normalised rows (not the raw mean, the seed's bug).
    cfg = TrainConfig(store=store, out=tmp_path / "pt", n_latents=N_LATENTS, k=4, normalization="per_token", steps=1)
    t = Trainer(cfg, DistContext())
    x = t.rows.gather(t.stream.stream_ids(0, t.rows.num_train_rows)).float()
    xn = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
    torch.testing.assert_close(t.sae.b_pre.detach(), xn.mean(0), rtol=1e-4, atol=1e-5)


def test_store_without_statistics_is_a_clear_error(tmp_path):
    x, _ = sparse_dictionary_data(500, D, 32, 2, seed=0)
    path = write_store(tmp_path / "raw", x, shard_rows=200, stats=False)
    with pytest.raises(ValueError, match="llama3-sae preprocess --store"):
        Trainer(TrainConfig(store=path, out=tmp_path / "o", n_latents=N_LATENTS, k=4), DistContext())


def test_ema_weights_are_saved_with_unit_decoder_rows(store, tmp_path):
    out = tmp_path / "sae"
    assert main_train(_args(store, out, ema_decay=0.9, plots=False, steps=20)) == 0
    tensors, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    sae = load_sae(out)
    ema_dec = tensors["ema.W_dec"]
    norms = ema_dec.norm(dim=1)
    assert (norms < 1 - 1e-4).any()  # the average of unit vectors is shorter, so folding is needed
    torch.testing.assert_close(sae.W_dec, ema_dec / norms[:, None])
    torch.testing.assert_close(sae.W_enc, tensors["ema.W_enc"] * norms[:, None])
    assert not torch.equal(sae.W_dec, tensors["model.W_dec"])
    assert json.loads((out / "metrics_summary.json").read_text())["ema"] is True


def test_bf16_selection_trains(store, tmp_path, monkeypatch):
    out = tmp_path / "sae"
    seen = set()
    forward = SparseAutoencoder.forward

    def spy(self, x, **kw):
        seen.add(kw.get("select_dtype"))
        return forward(self, x, **kw)

    monkeypatch.setattr(SparseAutoencoder, "forward", spy)
    assert main_train(_args(store, out, bf16=True, plots=False, steps=20, val_every=0)) == 0
    assert torch.bfloat16 in seen  # the training steps select in bf16 (the final evaluation does not)
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert all(math.isfinite(r["mse"]) for r in train) and train[-1]["mse"] < train[0]["mse"]
    assert load_sae(out).W_enc.dtype == torch.float32  # weights stay float32


def test_resume_decisions(store, trained, tmp_path, capsys):
    out = tmp_path / "sae"
    shutil.copytree(trained, out)
    before = load_file(out / "sae.safetensors")
    n_records = len(read_metrics(out / "metrics.jsonl"))
    # Same command again: resumes at the last checkpoint (the end), redoes only the final outputs.
    assert main_train(_args(store, out, jumprelu=True, jumprelu_rows=1000)) == 0
    after = load_file(out / "sae.safetensors")
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert len(read_metrics(out / "metrics.jsonl")) == n_records  # nothing reported twice
    # Changed training options: refused, naming the difference.
    assert main_train(_args(store, out, lr=1e-3)) == 2
    assert "lr: 0.003 -> 0.001" in capsys.readouterr().err
    assert main_train(_args(store, out, resume=False)) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite starts over.
    assert main_train(_args(store, out, resume=False, overwrite=True, steps=10, plots=False)) == 0
    assert json.loads((out / "metrics_summary.json").read_text())["steps"] == 10
    assert not (out / "jumprelu").exists()


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(root, step, {"w": torch.full((2,), float(step))}, {"note": step}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4]
    # A save killed halfway leaves a temporary directory (ignored, then cleaned) and an incomplete
    # directory without state.json is not a checkpoint.
    (root / ".tmp-step-000000005-999").mkdir()
    (root / "step-000000009").mkdir()
    assert ckpt.latest_checkpoint(root).name == "step-000000004"
    ckpt.save_checkpoint(root, 5, {"w": torch.zeros(2)}, {}, keep=2)
    assert not list(root.glob(".tmp-*"))
    tensors, meta = ckpt.load_checkpoint(root / "step-000000005")
    assert meta["step"] == 5 and torch.equal(tensors["w"], torch.zeros(2))


def test_truncate_metrics_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"split": "train", "step": s}) + "\n" for s in range(1, 8)) + '{"split": "tr')
    truncate_metrics(path, 4)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_batchtopk_trains_and_learns_a_threshold(store, tmp_path):
    out = tmp_path / "sae"
    assert main_train(_args(store, out, architecture="batchtopk", plots=False, steps=20, val_every=0)) == 0
    sae = load_sae(out)
    assert sae.cfg.architecture == "batchtopk" and bool((sae.threshold > 0).all())
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["l0"] == pytest.approx(4.0, abs=1e-4) for r in train)  # k per token on average over the batch


class _FakeWandb:
    """Stands in for the wandb package: records what the loop sends."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0
        self.util = type("util", (), {"generate_id": staticmethod(lambda: "run123")})

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1


def test_wandb_is_optional_offline_and_uses_the_original_names(store, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a clear error, not a traceback
    assert main_train(_args(store, tmp_path / "a", wandb=True, plots=False, steps=10)) == 2
    assert "pip install wandb" in capsys.readouterr().err
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert main_train(_args(store, tmp_path / "b", wandb=True, plots=False, steps=10, resume=False,
                            overwrite=True)) == 0
    assert fake.inits[0]["mode"] == "offline" and fake.inits[0]["id"] == "run123" and fake.finished == 1
    steps = [s for s, _ in fake.logged]
    assert steps == sorted(steps)
    first = fake.logged[0][1]
    for name in ("train/loss", "train/aux_loss", "train/total_loss", "debug/dead_latents_ratio", "learning_rate"):
        assert name in first
    assert any("val/explained_variance" in d for _, d in fake.logged)


def test_metrics_table_shows_the_issue_columns():
    from io import StringIO

    from rich.console import Console

    from training.logging import TrainDisplay

    buf = StringIO()
    console = Console(file=buf, force_terminal=True, width=160, color_system=None)
    with TrainDisplay(console, total_steps=100, start_step=0, enabled=True) as display:
        display.advance(10)
        display.add({"step": 10, "epoch": 0.1, "mse": 0.25, "aux_loss": 0.5, "l0": 31.5, "explained_variance": 0.8,
                     "dead_fraction": 0.02, "lr": 1e-4, "k": 32, "tokens_per_s": 12345.0, "eta_s": 125.0})
    text = buf.getvalue()
    for part in ("loss", "aux", "L0", "EV", "dead", "lr", "tok/s", "ETA", "0.25", "31.5", "2.0%", "12,345", "2:05"):
        assert part in text, part
    plain = StringIO()
    with TrainDisplay(Console(file=plain, width=200), total_steps=100, start_step=0, enabled=True) as display:
        display.add({"step": 10, "mse": 0.25, "l0": 31.5})
    assert plain.getvalue().strip() == "step 10  loss 0.25  L0 31.5"  # not a terminal: one plain line


def test_one_training_step_equals_one_computed_by_hand(store, tmp_path):
    """Forward (dense TopK, written out here), MSE in the normalised space, backward, the decoder gradient
    projected off each decoder row, gradient clipping, AdamW at the first step's learning rate, unit decoder
    rows -- against ``Trainer.train_step``. Leaving out any one of these steps changes the result."""
    cfg = TrainConfig(store=store, out=tmp_path / "o", n_latents=N_LATENTS, k=4, k_aux=0, batch_size=64, steps=10,
                      lr=1e-2, warmup_steps=2, grad_clip=0.05, weight_decay=0.01, normalization="dataset")
    t = Trainer(cfg, DistContext())
    sae = t.sae
    W_enc, b_enc, W_dec, b_pre = (p.detach().clone().double().requires_grad_(True)
                                  for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre))
    with torch.no_grad():  # the init has decoder = encoder rows; move the encoder so the two differ
        sae.W_enc.add_(0.05 * torch.randn(sae.W_enc.shape, generator=torch.Generator().manual_seed(3)))
        W_enc.copy_(sae.W_enc.double())
    x = t.stream.batch(0)
    s_in = float(sae.norm_in_scale)
    xn = x.double() * s_in  # dataset normalisation without a shift
    pre = torch.relu((xn - b_pre) @ W_enc.T + b_enc)
    idx = pre.topk(4, dim=1).indices
    h = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx))
    loss = ((h @ W_dec + b_pre) - xn).pow(2).mean()
    loss.backward()
    with torch.no_grad():
        g = W_dec.grad
        g -= (g * W_dec).sum(1, keepdim=True) / (W_dec * W_dec).sum(1, keepdim=True) * W_dec
        params = [W_enc, b_enc, W_dec, b_pre]
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        for p in params:
            p.grad *= min(1.0, cfg.grad_clip / (float(norm) + 1e-6))
    assert float(norm) > cfg.grad_clip  # the clip is active in this step
    opt = torch.optim.AdamW(params, lr=cfg.lr * lr_factor(0, warmup=2, total=10, final_ratio=cfg.lr_final_ratio),
                            betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    opt.step()
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=1, keepdim=True)
    t.train_step(x)
    for name, ref in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_pre", b_pre)):
        torch.testing.assert_close(getattr(sae, name).detach().double(), ref.detach(), rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
