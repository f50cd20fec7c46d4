"""What a training run leaves in --out besides its checkpoints: the decision what an existing OUT allows
(resume, --overwrite, refuse), and what the finished run leaves: the SAE, its JumpReLU conversion, the
training curves and ``metrics_summary.json``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llama3_sae.files import atomic_write_json
from sae import SparseAutoencoder, topk_to_jumprelu
from sae.metrics import evaluate_reconstruction

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import StoreRows, TrainStream, val_batches
from .logging import METRICS_FILE, plot_training_curves

SUMMARY_FILE = "metrics_summary.json"
JUMPRELU_DIR = "jumprelu"
PLOT_FILE = "plots/training_curves.png"


class NonFiniteError(ValueError):
    """Training produced NaN or inf: stopped, nothing saved."""


def decide_out(out: Path, cfg: TrainConfig, root: Path) -> tuple[str, str]:
    """What --out allows, on rank 0: ("ok", the checkpoint to resume or "") after applying --overwrite, or
    ("error", why). Creates OUT."""
    if out.exists() and not out.is_dir():
        return "error", f"--out {out} exists and is not a directory"
    if cfg.overwrite and out.exists():
        for name in (ckpt.CHECKPOINTS, METRICS_FILE, SUMMARY_FILE, JUMPRELU_DIR, "plots", "config.json",
                     "sae.safetensors"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    latest = ckpt.latest_checkpoint(root)
    if latest is not None and not cfg.resume:
        return "error", (f"{out} holds checkpoints of an earlier run; resume it (leave out --no-resume) or "
                         "pass --overwrite to start over")
    if latest is None and (out / "sae.safetensors").exists():
        return "error", (f"{out} already holds an SAE and no checkpoints to resume; pass --overwrite to "
                         "replace it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return "ok", str(latest) if latest is not None else ""


def write_jumprelu(sae: SparseAutoencoder, rows: StoreRows, stream: TrainStream, cfg: TrainConfig, out: Path,
                   console: Console) -> dict[str, Any]:
    """JumpReLU thresholds fitted on training rows (stream order, so reproducible), scored on the held-out rows."""
    n = min(cfg.jumprelu_rows, rows.num_train_rows)
    ids = stream.stream_ids(0, n)
    fit = [rows.gather(ids[i:i + cfg.batch_size]).float() for i in range(0, n, cfg.batch_size)]
    jump = topk_to_jumprelu(sae, fit)
    path = out / JUMPRELU_DIR
    jump.save(path)
    report = evaluate_reconstruction(jump, val_batches(rows, cfg.batch_size))
    scores = {k: v for k, v in report.as_dict().items() if k != "density_histogram"}
    out = {"path": str(path), "fit_rows": n, **scores}
    console.print(f"saved the JumpReLU conversion to {path}: val L0 {report.l0:.1f}, explained variance "
                       f"{report.explained_variance:.4f}", highlight=False)
    return out


def save_outputs(sae: SparseAutoencoder, val: dict[str, Any], records: list[dict[str, Any]], run: dict[str, Any], *,
                 dead: tuple[int, float], rows: StoreRows, stream: TrainStream, cfg: TrainConfig,
                 console: Console) -> dict[str, Any]:
    """On rank 0 after the last step: save the SAE (refusing non-finite weights), the JumpReLU conversion and
    the curves if asked, and ``metrics_summary.json`` (``run``'s fields, the final validation, the last
    training record). ``dead``: (window in rows, share of latents that did not fire in it). Returns the summary."""
    out = Path(cfg.out)
    if not all(bool(torch.isfinite(t).all()) for t in sae.state_dict().values()):
        raise NonFiniteError(f"refusing to save the SAE to {out}: its weights hold non-finite values")
    sae.save(out)
    window, dead_share = dead
    # Dead is measured on training rows: the held-out split (a few hundred rows) is far too small to say that a
    # latent never fires.
    console.print(f"saved the SAE to {out}: val L0 {val['l0']:.1f}, explained variance "
                  f"{val['explained_variance']:.4f}; dead {dead_share:.2%} (no activation in the last "
                  f"{window:,} training rows)", highlight=False)
    last_train = next((r for r in reversed(records) if r.get("split") == "train"), {})
    summary = {**run,
               "val": {k: v for k, v in val.items() if k not in ("split", "step", "tokens", "epoch")},
               "train_last": {k: v for k, v in last_train.items() if k not in ("split",)},
               "sae_config": sae.cfg.to_dict()}
    if cfg.jumprelu:
        summary["jumprelu"] = write_jumprelu(sae, rows, stream, cfg, out, console)
    if cfg.plots:
        try:
            summary["plot"] = str(plot_training_curves(records, out / PLOT_FILE))
        except ImportError:
            console.print("note: matplotlib is not installed, so no plots were written "
                          "(pip install 'llama3-sae[plots]')", highlight=False)
    atomic_write_json(out / SUMMARY_FILE, summary, indent=2)
    return summary
