"""Turning a trained TopK SAE into a JumpReLU SAE with the same L0 (Llama Scope's post-processing)."""

from __future__ import annotations

from typing import Iterable

import torch

from .model import SparseAutoencoder


@torch.no_grad()
def topk_to_jumprelu(sae: SparseAutoencoder, activations: torch.Tensor | Iterable[torch.Tensor], *,
                     n_passes: int = 3, bins: int = 256) -> SparseAutoencoder:
    """A JumpReLU copy of a TopK SAE whose per-latent thresholds reproduce, on ``activations``, how
    often each latent fired under TopK; the mean L0 on that data is therefore kept.

    For latent i fired on c_i tokens, the threshold t_i satisfies #{tokens: pre_i > t_i} = c_i. It is
    found by histogram refinement: each pass over the data narrows every latent's interval by ``bins``,
    so 3 passes resolve 1/256^3 of the pre-activation range. ``activations``: [N, d_model], or a list of
    such batches (it is read 1 + n_passes times). Latents that never fired get the largest
    pre-activation seen (they stay off on this data).
    """
    if sae.cfg.architecture != "topk":
        raise ValueError(f"topk_to_jumprelu converts a topk SAE, this one is {sae.cfg.architecture!r}")
    if n_passes < 1 or bins < 2:
        raise ValueError(f"need n_passes >= 1 and bins >= 2, got {n_passes}, {bins}")
    if not isinstance(activations, torch.Tensor) and iter(activations) is activations:
        raise ValueError("topk_to_jumprelu reads the data several times: pass a tensor or a list, not an iterator")
    batches = [activations] if isinstance(activations, torch.Tensor) else list(activations)
    L = sae.cfg.n_latents
    device = sae.W_enc.device

    def relu_pre(x: torch.Tensor) -> torch.Tensor:
        return sae.preactivations(x.to(device).reshape(-1, sae.cfg.d_model)).float().relu_()

    # Pass 0: TopK firing counts and each latent's largest pre-activation.
    target = torch.zeros(L, dtype=torch.int64, device=device)
    hi = torch.zeros(L, dtype=torch.float32, device=device)
    for x in batches:
        code = sae.encode(x.to(device).reshape(-1, sae.cfg.d_model), sparse=True)
        target += torch.bincount(code.indices[code.values > 0], minlength=L)
        hi = torch.maximum(hi, relu_pre(x).amax(0))

    # Invariant: count_above(lo) >= target >= count_above(hi). Above 0 every fired token counts, since
    # TopK keeps only positive values; above the maximum nothing does.
    lo = torch.zeros(L, dtype=torch.float32, device=device)
    above_lo = torch.full((L,), -1, dtype=torch.int64, device=device)  # unknown until the first pass
    above_hi = torch.zeros(L, dtype=torch.int64, device=device)
    cols = torch.arange(L, device=device)
    for _ in range(n_passes):
        width = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
        hist = torch.zeros(L * bins, dtype=torch.int64, device=device)
        new_above_hi = torch.zeros(L, dtype=torch.int64, device=device)
        for x in batches:
            v = relu_pre(x)  # [n, L]
            new_above_hi += (v > hi).sum(0)
            inside = (v > lo) & (v <= hi)
            b = ((v - lo) / width * bins).long().clamp_(0, bins - 1)
            hist += torch.bincount((cols * bins + b)[inside], minlength=L * bins)
        hist = hist.view(L, bins)
        # above[:, j] = #{pre > edge_j}, edge_j = lo + width * j / bins, for j = 0..bins.
        tail = hist.flip(1).cumsum(1).flip(1)  # sum of bins j..end
        above = torch.cat([tail, torch.zeros(L, 1, dtype=torch.int64, device=device)], 1) + new_above_hi[:, None]
        # The last edge still holding >= target tokens above it.
        ok = above >= target[:, None]
        j = (ok * torch.arange(bins + 1, device=device)).amax(1).clamp_max(bins - 1)
        above_lo = above.gather(1, j[:, None]).squeeze(1)
        above_hi = above.gather(1, (j + 1)[:, None]).squeeze(1)
        lo, hi = lo + width * j / bins, lo + width * (j + 1) / bins

    # Of the two interval ends take the one whose count is closer to the target (ties: the higher
    # threshold, so L0 never exceeds the TopK's on this data).
    threshold = torch.where((above_lo - target).abs() < (target - above_hi).abs(), lo, hi)
    out = SparseAutoencoder(sae.cfg.replace(architecture="jumprelu", k=None, rank_by_decoder_norm=False),
                            seed=None, device=device)
    state = {name: t for name, t in sae.state_dict().items()}
    state["threshold"] = threshold.clamp_min(0)
    out.load_state_dict(state)
    return out
