"""The learning-rate schedule, and what in a schedule does not fit the run it is planned for."""

from __future__ import annotations

import math

from .config import TrainConfig


def lr_factor(step: int, *, warmup: int, total: int, final_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up, then a cosine
    from 1 to ``final_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_warnings(cfg: TrainConfig, total_steps: int, global_batch: int) -> list[str]:
    """What in the schedule does not fit a run this long (a short run at the defaults is all warm-up)."""
    out = []
    warmup = min(cfg.warmup_steps, total_steps)
    if warmup >= total_steps / 2:
        out.append(f"the warm-up ({cfg.warmup_steps:,} steps) takes {warmup / max(total_steps, 1):.0%} of this "
                   f"{total_steps:,}-step run, so the learning rate is below --lr {cfg.lr:g} for most of it; for short "
                   "runs lower --warmup-steps and raise --lr (the demo trains 2,000 steps with --lr 1e-3 "
                   "--warmup-steps 100)")
    tokens = total_steps * global_batch
    if cfg.k_aux > 0 and cfg.aux_coeff > 0 and cfg.dead_after_tokens >= tokens:
        out.append(f"--dead-after-tokens {cfg.dead_after_tokens:,} is more than the {tokens:,} rows this run trains "
                   "on, so no latent can count as dead and the aux-k loss never starts; lower it (the demo uses "
                   "100,000)")
    return out
