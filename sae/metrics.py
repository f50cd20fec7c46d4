"""SAE quality metrics, shared by training and ``llama3-sae eval``.

Reconstruction: L0, MSE, explained variance / FVU. Latents: dead and dense fractions, a histogram of
log10 firing densities. Downstream: the language-model loss with the SAE spliced into ``llama3``, its
increase over the clean loss, and fidelity (Goodfire):

    fidelity = (loss with SAE - clean loss) / (loss with the site zero-ablated - clean loss)

0 means the SAE costs nothing, 1 means it is as bad as deleting the activation; ``loss_recovered`` is
1 - fidelity (the "CE loss score" of SAELens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from .model import SparseAutoencoder
from .steering import sae_hooks
from .sparse import SparseCode


# --------------------------------------------------------------------------- per-batch reconstruction
def l0(code: SparseCode | torch.Tensor) -> float:
    """Mean number of active latents per token (a dense code [..., n_latents] or a SparseCode)."""
    values = code.values if isinstance(code, SparseCode) else code
    return float((values != 0).sum(-1).float().mean())


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error per element."""
    return float((x_hat.double() - x.double()).pow(2).mean())


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the tokens of a batch [..., d]."""
    x2, e2 = x.reshape(-1, x.shape[-1]).double(), x_hat.reshape(-1, x.shape[-1]).double()
    total = (x2 - x2.mean(0)).pow(2).sum()
    if total == 0:
        raise ValueError("explained variance is undefined for a batch without variance")
    return float(1 - (x2 - e2).pow(2).sum() / total)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, 1 - explained_variance."""
    return 1.0 - explained_variance(x, x_hat)


# --------------------------------------------------------------------------- latent statistics
class LatentStats:
    """Firing counts per latent over a stream of codes."""

    def __init__(self, n_latents: int, device: torch.device | str | None = None):
        self.n_latents = n_latents
        self.fires = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.activation_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def update(self, code: SparseCode) -> None:
        flat = code.flatten()
        on = flat.values > 0
        idx = flat.indices[on]
        self.fires += torch.bincount(idx, minlength=self.n_latents).to(self.fires.device)
        self.activation_sum.index_add_(0, idx.to(self.fires.device), flat.values[on].double().to(self.fires.device))
        self.n_tokens += flat.values.shape[0]

    @property
    def density(self) -> torch.Tensor:
        """Fraction of tokens on which each latent fired."""
        if self.n_tokens == 0:
            raise ValueError("no tokens seen yet")
        return self.fires.double() / self.n_tokens

    def dead_fraction(self) -> float:
        """Latents that never fired on the data seen."""
        return float((self.fires == 0).double().mean())

    def dense_fraction(self, threshold: float = 0.1) -> float:
        """Latents firing on more than ``threshold`` of tokens."""
        return float((self.density > threshold).double().mean())

    def histogram(self, bins: int = 40, low: float = -8.0, high: float = 0.0) -> dict[str, Any]:
        """Histogram of log10(density) of the latents that fired; dead latents are counted apart."""
        return activation_density_histogram(self.density, bins=bins, low=low, high=high)


def activation_density_histogram(density: torch.Tensor, bins: int = 40, low: float = -8.0,
                                 high: float = 0.0) -> dict[str, Any]:
    """{"edges": log10 bin edges, "counts": latents per bin, "dead": latents with density 0}."""
    density = density.double().cpu()
    alive = density[density > 0]
    logs = alive.log10().clamp(low, high)
    counts = torch.histc(logs, bins=bins, min=low, max=high) if alive.numel() else torch.zeros(bins)
    edges = torch.linspace(low, high, bins + 1)
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()],
            "dead": int((density == 0).sum())}


# --------------------------------------------------------------------------- a whole evaluation set
@dataclass
class ReconstructionReport:
    n_tokens: int
    l0: float
    mse: float
    """Per element, in the input's own (raw) space."""
    explained_variance: float
    fvu: float
    dead_fraction: float
    dense_fraction: float
    density_histogram: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ReconstructionStats:
    """Streaming reconstruction statistics of one SAE: float64 sums in one pass (error, target mean and
    second moment) and per-latent firing counts. ``update`` batch after batch, then ``report``."""

    def __init__(self, sae: SparseAutoencoder):
        self.sae = sae
        d, device = sae.cfg.d_model, sae.W_enc.device
        self.latents = LatentStats(sae.cfg.n_latents, device=device)
        self.err2 = 0.0
        self.sum_y = torch.zeros(d, dtype=torch.float64, device=device)
        self.sum_y2 = 0.0
        self.active = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """x: rows the SAE encodes [N, d]; target: what it reconstructs (a transcoder's MLP output), default x."""
        sae = self.sae
        if sae.cfg.is_transcoder and target is None:
            raise ValueError("a transcoder is evaluated on (MLP input, MLP output) pairs; its input alone says "
                             "nothing about how well it predicts the output")
        x = sae.flatten(x.to(sae.W_enc.device))
        x_hat, code = sae.reconstruct_with_code(x)
        self.latents.update(code)
        y = (x if target is None else sae.flatten(target.to(x.device))).double()
        self.err2 += float((x_hat.double() - y).pow(2).sum())
        self.sum_y += y.sum(0)
        self.sum_y2 += float(y.pow(2).sum())
        self.active += float((code.values > 0).sum())

    @property
    def n_tokens(self) -> int:
        return self.latents.n_tokens

    def report(self, *, dense_threshold: float = 0.1) -> ReconstructionReport:
        n, d = self.n_tokens, self.sae.cfg.d_model
        if n == 0:
            raise ValueError("no activations were given")
        total_var = self.sum_y2 - float(self.sum_y.pow(2).sum()) / n
        ev = 1 - self.err2 / total_var if total_var > 0 else math.nan
        return ReconstructionReport(n_tokens=n, l0=self.active / n, mse=self.err2 / (n * d), explained_variance=ev,
                                    fvu=1 - ev, dead_fraction=self.latents.dead_fraction(),
                                    dense_fraction=self.latents.dense_fraction(dense_threshold),
                                    density_histogram=self.latents.histogram())


def evaluate_reconstruction(sae: SparseAutoencoder, activations: Iterable[Any] | torch.Tensor, *,
                            dense_threshold: float = 0.1) -> ReconstructionReport:
    """Stream batches [N, d_model] through the SAE (``ReconstructionStats``). For a transcoder each batch is
    a pair (MLP input, MLP output), and MSE / explained variance / FVU are of the predicted MLP output. A
    skip connection's term is part of the reconstruction."""
    batches = [activations] if isinstance(activations, (torch.Tensor, tuple)) else activations
    acc = ReconstructionStats(sae)
    for item in batches:
        x, y = item if isinstance(item, tuple) else (item, None)
        acc.update(x, y)
    return acc.report(dense_threshold=dense_threshold)


# --------------------------------------------------------------------------- downstream loss
@torch.no_grad()
def lm_loss(model: Any, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy of ``model`` on tokens [B, T]; ``mask`` [B, T] marks tokens to predict."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, seq] with seq >= 2, got {tuple(tokens.shape)}")
    logits = model(tokens)[:, :-1].float()
    targets = tokens[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if mask is None:
        return float(ce.mean())
    if mask.shape != tokens.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}")
    m = mask[:, 1:].reshape(-1).to(ce.dtype)
    if m.sum() == 0:
        raise ValueError("mask selects no tokens to predict")
    return float((ce * m).sum() / m.sum())


@torch.no_grad()
def downstream_loss(model: Any, sae: SparseAutoencoder, tokens: torch.Tensor, *, site: Any = None,
                    mask: torch.Tensor | None = None) -> dict[str, float]:
    """Clean loss, loss with the SAE's reconstruction spliced in, loss with the site zero-ablated, the
    difference ``delta_lm_loss`` and ``fidelity`` / ``loss_recovered``. Any other hooks the model has
    stay in place; the model's hooks are restored afterwards."""

    (target, recon), = sae_hooks(sae, model, mode="reconstruct", site=site).items()
    (_, zero), = sae_hooks(sae, model, mode="zero", site=target).items()
    store, fns = model.store_sites, dict(model.sae_fns)
    others = {s: f for s, f in fns.items() if s != target}
    try:
        model.set_hooks(store, others)
        clean = lm_loss(model, tokens, mask)
        model.set_hooks(store, {**others, target: recon})
        with_sae = lm_loss(model, tokens, mask)
        model.set_hooks(store, {**others, target: zero})
        ablated = lm_loss(model, tokens, mask)
    finally:
        model.set_hooks(store, fns)
    gap = ablated - clean
    fid = (with_sae - clean) / gap if gap != 0 else math.nan
    return {"clean_loss": clean, "sae_loss": with_sae, "zero_ablation_loss": ablated,
            "delta_lm_loss": with_sae - clean, "fidelity": fid, "loss_recovered": 1 - fid}
