"""Synthetic activation stores with a known answer, for tests, benchmarks and sanity checks.

``sparse_dictionary_data`` draws activations as sparse non-negative combinations of known unit
directions plus noise: an SAE that works should find those directions. ``write_store`` writes any
activations as a real activation store (capture's shard writer, manifest, and preprocess statistics),
so everything downstream runs its normal code path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capture.config import PreprocessConfig
from capture.preprocess import run_preprocess
from capture.store import DTYPE_NAMES, Manifest, write_shard

_DATA_SEED_OFFSET = 0x5EED_DA7A


def sparse_dictionary_data(n_rows: int, d_model: int = 64, n_features: int = 256, active: int = 4,
                           noise: float = 0.01, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations [n_rows, d_model], dictionary [n_features, d_model] of unit rows).

    Each row is the sum of ``active`` distinct random features with magnitudes uniform in [0.5, 1.5],
    plus isotropic Gaussian noise of standard deviation ``noise`` per dimension."""
    # Offset the seed: an SAE initialised from the same small seed draws the same Gaussian matrix, and its
    # initial decoder would already "recover" the dictionary.
    g = torch.Generator().manual_seed(_DATA_SEED_OFFSET + seed)
    dictionary = torch.randn(n_features, d_model, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    # ``active`` distinct features per row: the first columns of a random permutation per row.
    idx = torch.rand(n_rows, n_features, generator=g).argsort(dim=1)[:, :active]
    mags = torch.rand(n_rows, active, generator=g) + 0.5
    x = torch.nn.functional.embedding_bag(idx, dictionary, per_sample_weights=mags, mode="sum")
    x += noise * torch.randn(n_rows, d_model, generator=g)
    return x, dictionary


def write_store(path: str | Path, activations: torch.Tensor, *, shard_rows: int = 4096, site: str = "L0R",
                model: str = "synthetic", dtype: torch.dtype = torch.float32, stats: bool = True) -> Path:
    """Write ``activations`` [N, d] as an activation store (one document per ``shard_rows`` rows), and
    with ``stats`` run the preprocess statistics pass over it (no shuffle)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n, d = activations.shape
    entries = []
    for i, start in enumerate(range(0, n, shard_rows)):
        part = activations[start:start + shard_rows].to(dtype)
        rows = part.shape[0]
        entries.append(write_shard(path / f"shard-{i:06d}.safetensors", part, torch.zeros(rows, dtype=torch.int32),
                                   torch.full((rows,), i, dtype=torch.int64), torch.arange(rows, dtype=torch.int32),
                                   site=site))
    Manifest(d_model=d, dtype=DTYPE_NAMES[dtype], site=site, model=model, shards=entries, num_rows=n).write(path)
    if stats:

        run_preprocess(PreprocessConfig(store=path, shuffle=False, workers=1, progress=False))
    return path
