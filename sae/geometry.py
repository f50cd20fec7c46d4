"""How the latents of two SAEs relate (feature splitting across widths, seeds or layers), by the cosine
of their decoder directions, as Llama Scope's figure 7 and Neuronpedia show it.

For every latent of SAE B (typically the wider one) its best match in SAE A is the A latent whose decoder
row has the largest cosine with it. A B latent is

- **matched** when that cosine is at least ``match`` (default 0.7) and it is also the A latent's best
  match in B (a one-to-one pair),
- **split** when the cosine is at least ``split`` (default 0.5) but it shares its best A latent with other
  B latents that clear the same bar (one A feature split into several finer B features),
- **novel** when its best cosine is below ``split``: nothing in A is like it,

and the remaining ones (a good best match that is not mutual and not shared) are counted as **near**.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Matching:
    best: torch.Tensor
    """[n_b] index of each B latent's best A latent."""
    cosine: torch.Tensor
    """[n_b] that cosine."""
    kind: list[str]
    """[n_b] matched, split, near or novel."""
    splits: dict[int, list[int]] = field(default_factory=dict)
    """A latent -> the B latents it split into."""

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("matched", "split", "near", "novel")}
        for k in self.kind:
            out[k] += 1
        return out


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def match_latents(dec_a: torch.Tensor, dec_b: torch.Tensor, *, match: float = 0.7, split: float = 0.5,
                  chunk: int = 4096) -> Matching:
    """Match B's decoder rows [n_b, d] against A's [n_a, d] (see the module docstring)."""
    if dec_a.dim() != 2 or dec_b.dim() != 2 or dec_a.shape[1] != dec_b.shape[1]:
        raise ValueError(f"decoders must be [latents, d] with the same d, got {tuple(dec_a.shape)} and "
                         f"{tuple(dec_b.shape)}: the two SAEs must read the same width of activations")
    if not 0 <= split <= match <= 1:
        raise ValueError(f"need 0 <= split <= match <= 1, got split={split}, match={match}")
    a, b = unit_rows(dec_a), unit_rows(dec_b)
    best_b = torch.empty(b.shape[0], dtype=torch.long)
    cos_b = torch.empty(b.shape[0])
    best_a = torch.full((a.shape[0],), -1, dtype=torch.long)
    cos_a = torch.full((a.shape[0],), -2.0)
    for i in range(0, b.shape[0], chunk):  # [chunk, n_a] at a time: wide SAEs never need n_b x n_a at once
        sim = b[i:i + chunk] @ a.T
        v, j = sim.max(1)
        best_b[i:i + chunk], cos_b[i:i + chunk] = j, v
        va, ja = sim.max(0)
        better = va > cos_a
        cos_a = torch.where(better, va, cos_a)
        best_a = torch.where(better, ja + i, best_a)
    strong = cos_b >= split
    share = torch.bincount(best_b[strong], minlength=a.shape[0])
    kinds, splits = [], {}
    for bi in range(b.shape[0]):
        ai, c = int(best_b[bi]), float(cos_b[bi])
        if c < split:
            kinds.append("novel")
        elif int(share[ai]) > 1:
            kinds.append("split")
            splits.setdefault(ai, []).append(bi)
        elif c >= match and int(best_a[ai]) == bi:
            kinds.append("matched")
        else:
            kinds.append("near")
    return Matching(best_b, cos_b, kinds, splits)


def project_2d(directions: torch.Tensor) -> tuple[torch.Tensor, str]:
    """[n, 2] coordinates of unit directions for a map: UMAP (cosine metric) when umap-learn is installed,
    else the first two principal components. Returns (coordinates, the method's name)."""
    x = unit_rows(directions)
    try:
        import umap  # noqa: PLC0415 (optional: pip install umap-learn)

        coords = umap.UMAP(n_components=2, metric="cosine", random_state=0).fit_transform(x.numpy())
        return torch.as_tensor(coords, dtype=torch.float32), "UMAP"
    except ImportError:
        centred = x - x.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        return centred @ v[:2].T, "PCA"
