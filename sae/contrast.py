"""Which latents make one set of texts different from another (Goodfire's ``features.contrast``).

Each text is summarised by each latent's mean activation over its tokens. For every latent the two sets'
means are compared with Welch's t statistic, t = (mean_a - mean_b) / sqrt(var_a / n_a + var_b / n_b),
and a two-sided p-value from the normal approximation of t, Bonferroni-corrected for the number of
latents tested (so ``p_adjusted < 0.05`` means "would be surprising even after looking at every
latent"). Latents are ranked by t, not by the raw difference: a difference that one text carries
alone ranks low. A single text against a corpus baseline (the per-token mean activation of every
latent over the top-examples pass) is ranked by its lift over that baseline instead, since one text has
no variance of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Contrast:
    """One latent's difference between set A and set B."""

    latent: int
    mean_a: float
    mean_b: float
    t: float
    """Welch's t (positive: stronger in A)."""
    p_adjusted: float
    """Two-sided p-value of t (normal approximation), times the number of latents tested, capped at 1."""
    active_a: float
    """Share of A's texts in which the latent fired at all."""
    active_b: float

    @property
    def difference(self) -> float:
        return self.mean_a - self.mean_b


def _normal_two_sided(t: torch.Tensor) -> torch.Tensor:
    return torch.erfc(t.abs() / math.sqrt(2.0))


def contrast(a: torch.Tensor, b: torch.Tensor, *, top: int = 20, direction: str = "a") -> list[Contrast]:
    """Rank latents by how much more they fire on A than on B.

    a, b: [n_texts, n_latents] per-text mean activations (``n_a``, ``n_b`` >= 2). direction: "a" (stronger
    in A), "b" (stronger in B) or "both" (by |t|). Latents that fire in neither set are left out."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be [texts, latents] with the same latents, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"a contrast needs at least 2 texts on each side (got {a.shape[0]} and {b.shape[0]}); "
                         "for one text use contrast_with_baseline")
    if direction not in ("a", "b", "both"):
        raise ValueError(f"direction must be 'a', 'b' or 'both', got {direction!r}")
    a, b = a.double(), b.double()
    ma, mb = a.mean(0), b.mean(0)
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    diff = ma - mb
    # A latent constant on both sides with different means has se 0: its t is infinite in the sign of the
    # difference; constant and equal: no difference at all.
    t = torch.where(se > 0, diff / se.clamp_min(1e-300), diff.sign() * torch.inf)
    t = torch.where((se == 0) & (diff == 0), torch.zeros_like(t), t)
    live = ((a > 0).any(0) | (b > 0).any(0))
    p = (_normal_two_sided(t) * a.shape[1]).clamp(max=1.0)
    key = {"a": t, "b": -t, "both": t.abs()}[direction]
    key = torch.where(live, key, torch.full_like(key, -torch.inf))
    order = torch.argsort(key, descending=True)[:top]
    fa, fb = (a > 0).double().mean(0), (b > 0).double().mean(0)
    return [Contrast(int(i), float(ma[i]), float(mb[i]), float(t[i]), float(p[i]), float(fa[i]), float(fb[i]))
            for i in order.tolist() if bool(live[i])]


@dataclass(frozen=True)
class Lift:
    """One latent on one text against the corpus: its mean activation over the text's tokens and the
    corpus's per-token mean."""

    latent: int
    mean: float
    baseline: float

    @property
    def lift(self) -> float:
        return self.mean - self.baseline


def contrast_with_baseline(text: torch.Tensor, baseline: torch.Tensor, *, top: int = 20) -> list[Lift]:
    """Latents ranked by how far a text's mean activation ([n_latents]) exceeds the corpus baseline."""
    if text.shape != baseline.shape:
        raise ValueError(f"the text's activations {tuple(text.shape)} and the baseline {tuple(baseline.shape)} "
                         "must both be [n_latents]")
    lift = text.double() - baseline.double()
    order = torch.argsort(lift, descending=True)[:top]
    return [Lift(int(i), float(text[i]), float(baseline[i])) for i in order.tolist() if float(lift[i]) > 0]


def rerank_by_query(items: list, labels: dict[int, str], query: str) -> list:
    """``items`` (each with ``.latent``) reordered by how much their label shares with ``query``: the share
    of the query's words that start a word of the label (case-insensitive), ties kept in their order."""
    words = [w.lower() for w in query.split() if w.strip()]
    if not words:
        return list(items)

    def score(item) -> float:
        label_words = labels.get(item.latent, "").lower().replace("'", " ").split()
        return sum(any(lw.startswith(w) for lw in label_words) for w in words) / len(words)

    return sorted(items, key=lambda it: -score(it))
