"""Running a training job: the trainer for the layout, and the process around it (torchrun's environment,
the process RNGs, teardown)."""

from __future__ import annotations

import torch
from rich.console import Console

from llama3_sae.dist import DistContext, setup_distributed

from .config import TrainConfig
from .loop import Trainer, TrainResult
from .sharded import ShardedTrainer


def build_trainer(cfg: TrainConfig, ctx: DistContext, console: Console | None = None) -> Trainer:
    """The trainer for the layout: latent-sharded when --model-parallel > 1, else one process or DDP."""
    if cfg.model_parallel > 1:
        return ShardedTrainer(cfg, ctx, console)
    return Trainer(cfg, ctx, console)


def run_train(cfg: TrainConfig, console: Console | None = None) -> TrainResult:
    """Set up torch.distributed from torchrun's environment (if any), train, tear down."""
    ctx = setup_distributed(cfg.device, cfg.model_parallel, cfg.dist_timeout_min)
    # This is the job's entry point, so it owns the process RNGs: seeded here for a fresh run (torch seeds
    # them from the OS otherwise), restored from the checkpoint on resume. The training itself draws
    # from its own seeded generators.
    torch.manual_seed(cfg.seed)
    trainer = build_trainer(cfg, ctx, console)
    result = trainer.run()
    del trainer  # release DDP / DTensor state before the process group goes
    # Only after success: after a failure the other ranks may sit in a collective, and a barrier in the
    # teardown would hang instead of letting torchrun stop the job.
    ctx.close()
    return result


