"""SAEs wider than one device: the latent dimension split over the "model" axis of a DeviceMesh.

``W_enc``, ``b_enc`` and ``W_dec`` are DTensors sharded by latent (``Shard(0)``) over "model" and
replicated over "data"; ``b_pre`` is replicated. A forward on the ranks of one model group (which all
hold the same batch):

1. each rank computes the pre-activations of its own latents and their local top-k;
2. the k candidates of every rank are all-gathered and the global top-k taken, so the selection is
   exactly the unsharded TopK (the true top k are always among the union of local top k's);
3. each rank decodes the selected latents it owns; the partial reconstructions are summed with an
   all-reduce. The aux-k loss over dead latents goes the same way.

Gradients: every rank computes the same loss from the same summed reconstruction, so the gradient of
the loss w.r.t. a rank's partial sum is the gradient w.r.t. the sum (the all-reduce's backward is the
identity). The encoder input feeds every rank's latents, so its gradient (which reaches ``b_pre``) is
summed over the model group. Gradients are then averaged over the "data" axis. Decoder projection and
renormalisation act on whole latent rows, which never straddle ranks, so they stay local.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from llama3_sae.dist import DistContext
from sae import SparseAutoencoder
from sae.model import project_rows_
from sae.sparse import gathered_relu_linear, sparse_decode

from .config import TrainConfig
from .layouts import Replicated, StepOutput

_SHARDED = ("W_enc", "b_enc", "W_dec")
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_pre")


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward, because every rank of the group holds the same
    loss of the same sum, so each partial sum's gradient is the sum's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient backward: the input feeds every rank's
    slice of latents, so its full gradient is the sum of the slices' contributions."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def global_topk(scores: torch.Tensor, k: int, offset: int, group: Any,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of each row over the latents of all ranks of ``group``. ``scores``: this rank's [N, L_local]
    (latents ``offset .. offset + L_local``). Returns values [N, k] and global latent indices [N, k]."""
    kk = min(k, scores.shape[1])
    top = scores.topk(kk, dim=1, sorted=False)
    values, indices = top.values.contiguous(), (top.indices + offset).contiguous()
    if group_size > 1:
        all_v = [torch.empty_like(values) for _ in range(group_size)]
        all_i = [torch.empty_like(indices) for _ in range(group_size)]
        dist.all_gather(all_v, values, group=group)
        dist.all_gather(all_i, indices, group=group)
        values, indices = torch.cat(all_v, 1), torch.cat(all_i, 1)
    best = values.topk(k, dim=1, sorted=False)
    return best.values, indices.gather(1, best.indices)


class ShardedSAE(nn.Module):
    """A TopK SAE whose latents are split over the "model" mesh dimension (see the module docstring).
    Built from a whole ``SparseAutoencoder`` (same on every rank); ``state_dict`` names match it."""

    def __init__(self, sae: SparseAutoencoder, mesh: Any):
        super().__init__()
        cfg = sae.cfg
        if cfg.architecture != "topk":
            raise ValueError(f"latent sharding supports topk SAEs, not {cfg.architecture!r}")
        self.cfg = cfg
        self.mesh = mesh
        self.group = mesh.get_group("model")
        self.group_size = mesh["model"].size()
        self.local_rank = mesh["model"].get_local_rank()
        if cfg.n_latents % self.group_size:
            raise ValueError(f"n_latents={cfg.n_latents} must be divisible by the model-parallel size "
                             f"{self.group_size}")
        self.n_local = cfg.n_latents // self.group_size
        self.offset = self.local_rank * self.n_local
        self.placements = {n: [Replicate(), Shard(0)] if n in _SHARDED else [Replicate(), Replicate()] for n in _PARAMS}
        for name in _PARAMS:
            full = getattr(sae, name).detach()
            setattr(self, name, nn.Parameter(distribute_tensor(full, mesh, self.placements[name])))
        # Normalisation constants stay plain replicated tensors.
        for name, buf in sae.named_buffers():
            self.register_buffer(name, buf.detach().clone())

    # The normalisation code of SparseAutoencoder reads only ``cfg``, the norm buffers and W_enc's dtype,
    # all of which this module has: calling it keeps one definition of the normalisation.
    def normalize(self, x: torch.Tensor):
        return SparseAutoencoder.normalize(self, x)  # type: ignore[arg-type]

    def denormalize(self, y: torch.Tensor, stats: Any) -> torch.Tensor:
        return SparseAutoencoder.denormalize(self, y, stats)  # type: ignore[arg-type]

    def norm_stats(self, x: torch.Tensor):
        return SparseAutoencoder.norm_stats(self, x)  # type: ignore[arg-type]

    def local(self, name: str) -> torch.Tensor:
        return getattr(self, name).to_local()

    def _select(self, scores: torch.Tensor, k: int, xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global top-k of ``scores`` -> (values of this rank's selected latents with autograd [N, k],
        their local indices [N, k] (0 where not ours), which slots are ours, the global values [N, k])."""
        values, gidx = global_topk(scores, k, self.offset, self.group, self.group_size)
        mine = (gidx >= self.offset) & (gidx < self.offset + self.n_local) & (values > 0)
        lidx = torch.where(mine, gidx - self.offset, torch.zeros_like(gidx))
        relu_vals = torch.where(mine, values, torch.zeros_like(values))
        # The mask again after the call: the dense fallback of gathered_relu_linear recomputes the values
        # from the indices and would give latent 0's value to the slots that are not ours.
        own = gathered_relu_linear(xc, W_enc, b_enc, lidx, relu_vals) * mine.to(xc.dtype)
        return own, lidx, mine, values

    def forward(self, x: torch.Tensor, k: int, dead_mask: torch.Tensor | None, k_aux: int, aux_coeff: float
                ) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        flat = x.reshape(-1, cfg.d_model)
        xn, stats = self.normalize(flat)
        W_enc, b_enc, W_dec, b_pre = (self.local(n) for n in _PARAMS)
        xc = xn - b_pre if cfg.apply_b_pre_to_input else xn
        xc = _SumGradOverGroup.apply(xc, self.group)
        with torch.no_grad():
            pre = torch.addmm(b_enc, xc.detach(), W_enc.t()).relu_()  # [N, L_local]
        values, lidx, mine, gvalues = self._select(pre, k, xc, W_enc, b_enc)
        x_hat_n = _SumOverGroup.apply(sparse_decode(values, lidx, W_dec), self.group) + b_pre
        target = (flat.float() - stats.shift) * stats.out_scale
        mse = (x_hat_n.float() - target).pow(2).mean()
        aux_loss = mse.new_zeros(())
        if dead_mask is not None and k_aux > 0:
            n_dead = dead_mask.sum().reshape(1)
            dist.all_reduce(n_dead, group=self.group)
            if int(n_dead) > 0:
                with torch.no_grad():
                    # Live latents get -1 so that they lose to every dead one (pre is >= 0 after relu).
                    dead_scores = torch.where(dead_mask.to(pre.device)[None, :], pre, torch.full_like(pre, -1.0))
                aux_vals, aux_idx, _, _ = self._select(dead_scores, min(k_aux, int(n_dead)), xc, W_enc, b_enc)
                residual = (target - x_hat_n.float()).detach()
                e_hat = _SumOverGroup.apply(sparse_decode(aux_vals, aux_idx, W_dec), self.group).float()
                denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
                aux_loss = (e_hat - residual).pow(2).sum() / denom
        loss = mse + aux_coeff * aux_loss
        counts = torch.bincount(lidx[mine], minlength=self.n_local)  # firings of this rank's latents
        l0 = (gvalues > 0).sum(-1).float().mean()
        x_hat = self.denormalize(x_hat_n, stats).reshape(x.shape)
        return loss, mse.detach(), aux_loss.detach(), counts, x_hat.detach(), l0


class LatentSharded(Replicated):
    """The layout of --model-parallel > 1: the latents split over the "model" mesh dimension, gradients
    averaged over the "data" axis by hand (DDP does not take DTensor parameters)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext):
        super().__init__(cfg, ctx)
        if ctx.mesh is None:
            raise ValueError("--model-parallel > 1 needs several processes: launch with torchrun --nproc-per-node N")
        self.sharded: ShardedSAE | None = None

    @property
    def n_local(self) -> int:
        return self.sharded.n_local if self.sharded is not None else self.cfg.n_latents // self.ctx.model_parallel

    def build(self, sae: SparseAutoencoder) -> None:
        self.sharded = ShardedSAE(sae, self.ctx.mesh)
        self.model = self.sharded
        self.sae = None

    def fused_optimizer(self) -> bool | None:
        return None  # DTensor parameters: the default (for-each) AdamW, which DTensor dispatches shard-wise

    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, getattr(self.sharded, n)) for n in _PARAMS]

    def local_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.to_local().detach()) for n, p in self.parameters()]

    def forward(self, x: torch.Tensor, k: int, dead_mask: torch.Tensor | None,
                target: torch.Tensor | None) -> StepOutput:
        assert target is None, "latent sharding trains SAEs, not transcoders (TrainConfig refuses the pair)"
        loss, mse, aux, counts, x_hat, l0 = self.sharded(x, k, dead_mask, self.cfg.k_aux, self.cfg.aux_coeff)
        return StepOutput(loss, mse, aux, counts > 0, x_hat, l0)

    def reduce_gradients(self) -> None:
        if self.ctx.data_parallel > 1:
            for _, p in self.parameters():
                g = p.grad.to_local()
                dist.all_reduce(g, group=self.ctx.dp_group)
                g.div_(self.ctx.data_parallel)

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        project_rows_(self.sharded.W_dec.grad.to_local(), self.sharded.local("W_dec"))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        w = self.sharded.local("W_dec")
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def clip_grad_norm_(self) -> torch.Tensor:
        sq = torch.zeros(2, dtype=torch.float32, device=self.ctx.device)  # sharded, replicated
        for name, p in self.parameters():
            sq[0 if name in _SHARDED else 1] += p.grad.to_local().float().pow(2).sum()
        sharded = sq[:1].clone()
        dist.all_reduce(sharded, group=self.ctx.mp_group)
        total = (sharded[0] + sq[1]).sqrt()
        if self.cfg.grad_clip > 0:
            coef = (self.cfg.grad_clip / (total + 1e-6)).clamp(max=1.0)
            for _, p in self.parameters():
                p.grad.to_local().mul_(coef)
        return total

    def sync_after_step(self) -> None:
        pass  # TopK only: no batch-dependent state

    def sum_over_latent_shards(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.ctx.mp_group)
        return t

    @torch.no_grad()
    def eval_batch(self, x: torch.Tensor, target: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        assert target is None, "latent sharding trains SAEs, not transcoders (TrainConfig refuses the pair)"
        _, mse, _, counts, x_hat, l0 = self.sharded(x, self.cfg.k, None, 0, 0.0)
        return x_hat.float(), l0 * x.reshape(-1, self.sharded.cfg.d_model).shape[0], counts, mse

    # ------------------------------------------------------------------ whole tensors <-> slices
    def _placements(self, name: str) -> list[Any]:
        return self.sharded.placements.get(name, [Replicate(), Shard(0)])  # tracker counters: per latent

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: DTensor.from_local(t.contiguous(), self.ctx.mesh, self._placements(name)).full_tensor()
                for name, t in tensors.items()}

    def piece(self, name: str, full: torch.Tensor) -> torch.Tensor:
        if isinstance(self._placements(name)[1], Shard):
            return full.chunk(self.sharded.group_size, dim=0)[self.sharded.local_rank].clone()
        return full.clone()

    def full_state(self, ema: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        state = self.gather(dict(ema) if ema is not None else dict(self.local_tensors()))
        state.update({n: b.detach() for n, b in self.sharded.named_buffers()})
        return state

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.parameters():
                p.to_local().copy_(self.piece(name, state[name]))
            for name, b in self.sharded.named_buffers():
                b.copy_(state[name])

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = optimizer.state_dict()
        full_state = {idx: {key: (v.full_tensor() if isinstance(v, DTensor) else v) for key, v in per_param.items()}
                      for idx, per_param in state["state"].items()}
        return {"state": full_state, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        params = self.parameters()
        converted = {}
        for idx, per_param in state["state"].items():
            name, _ = params[idx]
            converted[idx] = {}
            for key, v in per_param.items():
                if key == "step" or v.dim() == 0:
                    converted[idx][key] = v
                else:
                    local = self.piece(name, v).to(self.ctx.device)
                    converted[idx][key] = DTensor.from_local(local, self.ctx.mesh, self.sharded.placements[name])
        optimizer.load_state_dict({"state": converted, "param_groups": state["param_groups"]})
