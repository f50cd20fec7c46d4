"""Running a training job: the trainer, and the process around it (torchrun's environment,
the process RNGs, teardown)."""

from __future__ import annotations

import torch
from rich.console import Console

from llama3_sae.dist import setup_distributed

from .config import TrainConfig
from .loop import Trainer, TrainResult


def run_train(cfg: TrainConfig, console: Console | None = None) -> TrainResult:
    """Set up torch.distributed from torchrun's environment (if any), train, tear down."""
    ctx = setup_distributed(cfg.device, cfg.model_parallel, cfg.dist_timeout_min)
    # This is the job's entry point, so it owns the process RNGs: seeded here for a fresh run (torch seeds
    # them from the OS otherwise), restored from the checkpoint on resume. The training itself draws
    # from its own seeded generators.
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, ctx, console)  # the layout follows cfg.model_parallel
    result = trainer.run()
    del trainer  # release DDP / DTensor state before the process group goes
    # Only after success: after a failure the other ranks may sit in a collective, and a barrier in the
    # teardown would hang instead of letting torchrun stop the job.
    ctx.close()
    return result


