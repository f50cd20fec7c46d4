"""The SAE architectures, one class each behind one interface: which latents a token keeps and what the
architecture adds to the module (thresholds) and to the loss (an L1 penalty). ``SparseAutoencoder`` picks
its class from ``cfg.architecture`` in ``ACTIVATIONS``; a new architecture is a new class here."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from .config import ARCHITECTURES

if TYPE_CHECKING:  # the module only receives an SAE; the class imports this module
    from .model import SparseAutoencoder


class Selection(NamedTuple):
    """The kept latents of each token: indices [N, m], their relu pre-activations [N, m] (0 in padded or
    rejected slots), and for BatchTopK in training the smallest kept score of the batch."""

    indices: torch.Tensor
    values: torch.Tensor
    batch_threshold: float | None = None


class Activation:
    """Base of the architectures. ``select`` runs without autograd on relu(pre) [N, L]."""

    name = ""
    uses_k = False
    """Takes k (topk, batchtopk): the aux-k loss and k-annealing apply."""
    learns_threshold = False
    """Holds a per-latent ``threshold`` buffer."""
    selects_over_batch = False
    """In training, selects over the whole batch (BatchTopK); at inference it applies its threshold."""

    def register_buffers(self, sae: "SparseAutoencoder", device: torch.device | str | None) -> None:
        if self.learns_threshold:
            # float32 whatever the weights are: bf16 would shift every threshold comparison.
            sae.register_buffer("threshold", torch.zeros(sae.cfg.n_latents, dtype=torch.float32, device=device))

    def select(self, sae: "SparseAutoencoder", pre: torch.Tensor, k: int | None, batch_topk: bool) -> Selection:
        raise NotImplementedError

    per_latent = False
    """At inference a latent's activation depends on its own pre-activation alone (no ranking against the
    others), so a few latents' codes can be computed from their encoder rows alone (``columns``)."""

    def columns(self, sae: "SparseAutoencoder", pre: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Inference codes [N, E] of ``latents`` from their relu pre-activations [N, E] (``per_latent`` only)."""
        if not self.per_latent:
            raise ValueError(f"{self.name} ranks latents against each other: compute the whole code")
        return pre.masked_fill(pre <= sae.threshold[latents], 0) if self.learns_threshold else pre

    def penalty(self, sae: "SparseAutoencoder", values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """The sparsity penalty this architecture trains with (None: none)."""
        return None


def _check_k(sae: "SparseAutoencoder", k: int | None, L: int) -> int:
    k = sae.cfg.k if k is None else int(k)
    if not 0 < k <= L:
        raise ValueError(f"k={k} must be in 1..n_latents={L}")
    return k


def _score(sae: "SparseAutoencoder", pre: torch.Tensor) -> torch.Tensor:
    return pre * sae.decoder_norms().to(pre.dtype) if sae.cfg.rank_by_decoder_norm else pre


def _variable(pre: torch.Tensor) -> Selection:
    """Every positive entry per token, padded to the row maximum with zeros."""
    m = int((pre > 0).sum(1).max()) if pre.shape[0] else 0
    idx = pre.topk(m, dim=1, sorted=False).indices
    return Selection(idx, pre.gather(1, idx))


class TopK(Activation):
    """k latents per token, ranked by relu(pre) (times ||W_dec[i]|| with rank_by_decoder_norm)."""

    name, uses_k = "topk", True

    def select(self, sae, pre, k, batch_topk):
        k = _check_k(sae, k, pre.shape[1])
        idx = _score(sae, pre).topk(k, dim=1, sorted=False).indices
        return Selection(idx, pre.gather(1, idx))


class BatchTopK(Activation):
    """k latents per token on average over a training batch (Bussmann et al.); at inference a JumpReLU with
    the threshold learned in training."""

    name, uses_k, learns_threshold, selects_over_batch, per_latent = "batchtopk", True, True, True, True

    def register_buffers(self, sae, device):
        super().register_buffers(sae, device)
        sae.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64, device=device))

    def select(self, sae, pre, k, batch_topk):
        if not batch_topk:
            if k is not None:
                raise ValueError("a BatchTopK SAE applies its learned threshold at inference; k applies only to its "
                                 "training batches (sae.train())")
            return _variable(pre.masked_fill_(pre <= sae.threshold, 0))
        k = _check_k(sae, k, pre.shape[1])
        idx, valid, threshold = _batch_topk_indices(_score(sae, pre), k)
        return Selection(idx, pre.gather(1, idx) * valid.to(pre.dtype), threshold)


class JumpReLU(Activation):
    """relu(pre) where pre > threshold_i (per latent, float32)."""

    name, learns_threshold, per_latent = "jumprelu", True, True

    def select(self, sae, pre, k, batch_topk):
        if k is not None:
            raise ValueError(f"k applies to topk/batchtopk SAEs, not architecture={sae.cfg.architecture!r}")
        return _variable(pre.masked_fill_(pre <= sae.threshold, 0))


class ReLU(Activation):
    """relu(pre), trained with an L1 penalty on h_i ||W_dec[i]||."""

    name, per_latent = "relu", True

    def select(self, sae, pre, k, batch_topk):
        if k is not None:
            raise ValueError(f"k applies to topk/batchtopk SAEs, not architecture={sae.cfg.architecture!r}")
        return _variable(pre)

    def penalty(self, sae, values, indices):
        norms = sae.W_dec.float().norm(dim=1)  # differentiable: the penalty also shapes the decoder
        return (values.float() * norms[indices]).sum(-1).mean()


ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (TopK(), BatchTopK(), JumpReLU(), ReLU())}
assert tuple(ACTIVATIONS) == ARCHITECTURES, "sae.config.ARCHITECTURES and the classes here must agree"


def _batch_topk_indices(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """BatchTopK: the k * N largest positive scores of the whole batch, as per-row indices [N, m] padded
    with index 0, a validity mask [N, m], and the smallest kept score."""
    N, L = score.shape
    flat = score.reshape(-1).topk(min(k * N, N * L), sorted=False)
    kept = flat.values > 0
    pos = flat.indices[kept]
    threshold = float(flat.values[kept].min()) if bool(kept.any()) else 0.0
    rows, cols = pos // L, pos % L
    counts = torch.bincount(rows, minlength=N)
    m = int(counts.max()) if N else 0
    order = torch.argsort(rows, stable=True)
    rows, cols = rows[order], cols[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=score.device) - starts[rows]
    idx = torch.zeros(N, m, dtype=torch.long, device=score.device)
    valid = torch.zeros(N, m, dtype=torch.bool, device=score.device)
    idx[rows, slot] = cols
    valid[rows, slot] = True
    return idx, valid, threshold
