"""What a training run leaves in --out besides its checkpoints: the decision what an existing OUT allows
(resume, --overwrite, refuse), and the final artifacts beside the SAE (the JumpReLU conversion)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from sae import SparseAutoencoder, topk_to_jumprelu
from sae.metrics import evaluate_reconstruction

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import StoreRows, TrainStream, val_batches
from .logging import METRICS_FILE

SUMMARY_FILE = "metrics_summary.json"
JUMPRELU_DIR = "jumprelu"


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
