"""Pieces of an SAE training loop that belong to the SAE: dead-latent tracking and k-annealing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class DeadLatentTracker:
    """Tokens since each latent last fired (OpenAI's definition of dead: none in ``dead_after_tokens``).

    Under DDP, every rank calls ``update(fired, n_tokens=<tokens in the global batch>)`` and then
    ``all_reduce_()`` (MIN): a latent that fired on any rank drops to 0 everywhere, and the others grow
    by the same global count on every rank, so the ranks agree.
    """

    def __init__(self, n_latents: int, dead_after_tokens: int = 10_000_000,
                 device: torch.device | str | None = None):
        if n_latents <= 0 or dead_after_tokens <= 0:
            raise ValueError(f"n_latents={n_latents} and dead_after_tokens={dead_after_tokens} must be positive")
        self.dead_after_tokens = int(dead_after_tokens)
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        if fired.shape != self.tokens_since_fired.shape or fired.dtype != torch.bool:
            raise ValueError(f"fired must be a bool tensor of shape {tuple(self.tokens_since_fired.shape)}, "
                             f"got {fired.dtype} {tuple(fired.shape)}")
        self.tokens_since_fired.add_(int(n_tokens)).masked_fill_(fired.to(self.tokens_since_fired.device), 0)

    def all_reduce_(self, group=None) -> None:
        import torch.distributed as dist

        dist.all_reduce(self.tokens_since_fired, op=dist.ReduceOp.MIN, group=group)

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.dead_after_tokens

    @property
    def dead_fraction(self) -> float:
        return float(self.dead_mask.float().mean())

    def state_dict(self) -> dict:
        return {"tokens_since_fired": self.tokens_since_fired.clone(), "dead_after_tokens": self.dead_after_tokens}

    def load_state_dict(self, state: dict) -> None:
        t = state["tokens_since_fired"]
        if t.shape != self.tokens_since_fired.shape:
            raise ValueError(f"tracker state has {tuple(t.shape)} latents, expected {tuple(self.tokens_since_fired.shape)}")
        self.tokens_since_fired.copy_(t)
        self.dead_after_tokens = int(state["dead_after_tokens"])


@dataclass(frozen=True)
class KSchedule:
    """k as a function of the training step: from ``k_start`` down to ``k`` over ``anneal_steps``, then
    ``k`` (Llama Scope's k-annealing). ``shape`` "linear" interpolates k, "exponential" interpolates
    log k. The loop calls ``sae(x, k=schedule(step))``."""

    k: int
    k_start: int
    anneal_steps: int
    shape: str = "linear"

    def __post_init__(self) -> None:
        if not (1 <= self.k <= self.k_start):
            raise ValueError(f"need 1 <= k <= k_start, got k={self.k}, k_start={self.k_start}")
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps={self.anneal_steps} must be >= 0")
        if self.shape not in ("linear", "exponential"):
            raise ValueError(f"shape={self.shape!r} must be 'linear' or 'exponential'")

    def __call__(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        if step >= self.anneal_steps:
            return self.k
        frac = step / self.anneal_steps
        if self.shape == "linear":
            value = self.k_start + (self.k - self.k_start) * frac
        else:
            value = math.exp(math.log(self.k_start) + (math.log(self.k) - math.log(self.k_start)) * frac)
        return max(self.k, min(self.k_start, round(value)))
