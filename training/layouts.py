"""How the SAE being trained is laid out over the ranks: the strategy the one ``Trainer`` takes.

``Replicated`` (one process, or DDP): every rank holds the whole SAE; DistributedDataParallel averages
the gradients while backward runs. ``LatentSharded`` (``training.sharded``, --model-parallel > 1): the
latents are split over the "model" axis of a DeviceMesh. The trainer calls only the methods below, so
the step, validation, checkpoints and EMA are written once for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llama3_sae.dist import DistContext
from sae import SparseAutoencoder
from sae.activations import ACTIVATIONS
from sae.io import load_state

from .config import TrainConfig


@dataclass
class StepOutput:
    """What a layout's ``forward`` hands the step."""

    loss: torch.Tensor
    """The loss, with its graph."""
    mse: torch.Tensor
    aux_loss: torch.Tensor
    fired: torch.Tensor
    """[latents held by this rank] bool."""
    x_hat: torch.Tensor
    """[B, d] reconstruction in the input's space."""
    l0: torch.Tensor


class SAEObjective(nn.Module):
    """The SAE behind a forward that returns the loss, so that DistributedDataParallel's own forward runs
    and its gradient all-reduce hooks fire (calling a method of ``model.module`` bypasses them, and every
    rank trains its own copy)."""

    def __init__(self, sae: SparseAutoencoder, k_aux: int, aux_coeff: float, select_dtype: torch.dtype | None = None):
        super().__init__()
        self.sae, self.k_aux, self.aux_coeff, self.select_dtype = sae, k_aux, aux_coeff, select_dtype

    def forward(self, x: torch.Tensor, k: int, dead_mask: torch.Tensor | None,
                target: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out = self.sae(x, target=target, k=k, dead_mask=dead_mask, k_aux=self.k_aux, aux_coeff=self.aux_coeff,
                       select_dtype=self.select_dtype)
        l0 = (out.code.values > 0).sum(-1).float().mean()
        return out.loss, out.mse.detach(), out.aux_loss.detach(), out.fired, out.x_hat.detach(), l0


class Replicated:
    """Every rank holds the whole SAE (the base strategy; ``LatentSharded`` overrides what differs)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.sae: SparseAutoencoder | None = None
        """The whole SAE whose weights train (None when sharded: it exists only when gathered)."""
        self.model: nn.Module | None = None
        """What a step calls: ``SAEObjective``, under DDP when there are several ranks."""

    @property
    def n_local(self) -> int:
        """Latents this rank holds."""
        return self.cfg.n_latents

    def build(self, sae: SparseAutoencoder) -> None:
        self.sae = sae
        objective = SAEObjective(sae, self.cfg.k_aux, self.cfg.aux_coeff,
                                 select_dtype=torch.bfloat16 if self.cfg.bf16 else None)
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device = self.ctx.device
            ids = [device.index] if device.type == "cuda" else None
            # Gradients as views of DDP's buckets: no copy between the all-reduce and the optimizer.
            self.model = DDP(objective, device_ids=ids, gradient_as_bucket_view=True)
        else:
            self.model = objective

    def fused_optimizer(self) -> bool | None:
        """AdamW's fused kernel (one pass over each parameter instead of a dozen elementwise ops; several
        times faster for wide SAEs on CPU) where it runs: plain float tensors on CPU or CUDA."""
        return True if self.ctx.device.type in ("cpu", "cuda") else None

    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trained parameters with their SAE names, in optimizer order."""
        return list(self.sae.named_parameters())

    def local_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """This rank's tensors of the parameters (the whole parameter here; a slice when sharded)."""
        return [(n, p.data) for n, p in self.parameters()]

    # ------------------------------------------------------------------ the step
    def forward(self, x: torch.Tensor, k: int, dead_mask: torch.Tensor | None,
                target: torch.Tensor | None) -> StepOutput:
        """The loss (with its graph) and what the step reports."""
        return StepOutput(*self.model(x, k, dead_mask, target))

    def reduce_gradients(self) -> None:
        """After backward: make every rank hold the gradients of the global batch (DDP already has)."""

    def project_decoder_grad_(self) -> None:
        self.sae.project_decoder_grad_()

    def normalize_decoder_(self) -> None:
        self.sae.normalize_decoder_()

    def clip_grad_norm_(self) -> torch.Tensor:
        """The total gradient norm, clipped to --grad-clip when that is > 0."""
        params = [p for _, p in self.parameters()]
        if self.cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    def sync_after_step(self) -> None:
        """Make rank-local state equal again after an optimizer step."""
        if self.ctx.distributed and ACTIVATIONS[self.cfg.architecture].selects_over_batch:
            # Each rank's threshold follows its own batch; their average is the global batch's estimate.
            t = self.sae.threshold
            dist.all_reduce(t)
            t.div_(self.ctx.world)

    def sum_over_latent_shards(self, t: torch.Tensor) -> torch.Tensor:
        """A per-rank count over this rank's latents, summed over all latents."""
        return t

    @torch.no_grad()
    def eval_batch(self, x: torch.Tensor, target: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat [B, d], active latents in the batch, firing counts of this rank's latents, normalised MSE)."""
        self.sae.eval()  # BatchTopK uses its inference threshold
        try:
            out = self.sae(x, target=target)
        finally:
            self.sae.train()
        on = out.code.values > 0
        counts = torch.bincount(out.code.indices[on], minlength=self.cfg.n_latents)
        return out.x_hat.float(), on.sum(), counts, out.mse

    # ------------------------------------------------------------------ whole tensors <-> this rank's pieces
    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors from this rank's pieces (named like ``local_tensors``, or per-latent counters)."""
        return tensors

    def piece(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the whole tensor ``name``."""
        return full

    def full_state(self, ema: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The SAE's full state dict (parameters from ``ema`` when given). Collective when sharded."""
        state = {k: v.detach() for k, v in self.sae.state_dict().items()}
        state.update(ema or {})
        return state

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        load_state(self.sae, {k: v.to(self.sae.state_dict()[k].dtype) for k, v in state.items()}, where="checkpoint")

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict with whole tensors."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

