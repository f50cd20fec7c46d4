"""``load_sae``: this project's format or a published SAE (SAELens, Llama Scope's release layout and
llamascopium's, sparsify, Goodfire), into one ``SparseAutoencoder``; ``export_sae_lens`` writes ours in
SAELens's layout.

Each foreign layout is converted once, at load time, into our parameters so that ``encode``/``decode``
compute what the original library computes, and ``encode`` returns that library's codes. Each loader's
docstring gives its library's math; ``tests/test_interop.py`` checks them against the libraries themselves
(the release layout against lm-saes 1.x's math, written out in ``tests/test_sae_loaders.py``).

Hook names: TransformerLens's (``blocks.L.hook_resid_post``; SAELens, Llama Scope) and Hugging Face module
names (``layers.L.mlp``; sparsify) map to sites. TransformerLens's ``ln1/ln2.hook_normalized`` come before
the RMSNorm weight and ours after it: such SAEs carry ``source["input_before_norm_weight"]`` until
``sae.steering.bind_to_model`` folds the model's weight into them."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import DTYPES, canonical_site
from ..io import is_native_dir
from ..model import SparseAutoencoder
from .common import hook_name_to_site, site_to_hook_name
from .goodfire import TORCH_SUFFIXES, _load_goodfire
from .llama_scope import (LLAMA_SCOPE_CFG, LLAMASCOPIUM_CFG, _is_llamascopium, _llama_scope_weights, _load_llama_scope,
                          _load_llamascopium)
from .sae_lens import SAE_LENS_CFG, SAE_LENS_WEIGHTS, _load_sae_lens, export_sae_lens
from .sparsify import SPARSIFY_CFG, SPARSIFY_WEIGHTS, _load_sparsify

FORMATS = ("llama3-sae", "sae_lens", "llama_scope", "llamascopium", "sparsify", "goodfire")


def detect_format(path: str | Path) -> str:
    """Which layout ``path`` holds, judged by its files and their contents."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        if p.suffix in TORCH_SUFFIXES:
            return "goodfire"
        raise ValueError(f"{p} is a file; an SAE is a directory (ours, SAELens, Llama Scope, sparsify) or a "
                         f"Goodfire {'/'.join(TORCH_SUFFIXES)} state dict")
    if is_native_dir(p):
        return "llama3-sae"
    if (p / SAE_LENS_CFG).is_file() and (p / SAE_LENS_WEIGHTS).is_file():
        return "sae_lens"
    if (p / LLAMA_SCOPE_CFG).is_file() and _llama_scope_weights(p) is not None:
        return "llama_scope"
    if _is_llamascopium(p):
        return "llamascopium"
    if (p / SPARSIFY_CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    torch_files = sorted(f for f in p.iterdir() if f.suffix in TORCH_SUFFIXES)
    if len(torch_files) == 1:
        return "goodfire"
    subdirs = sorted(d.name for d in p.iterdir() if d.is_dir() and any(
        (d / name).is_file() for name in ("cfg.json", LLAMA_SCOPE_CFG, LLAMASCOPIUM_CFG)))
    hint = f"; it holds SAEs in {subdirs[:8]}{'...' if len(subdirs) > 8 else ''}: pass one of those" if subdirs else ""
    found = sorted(f.name for f in p.iterdir())[:12]
    raise ValueError(f"{p}: no known SAE layout (files: {found}){hint}. Expected config.json + sae.safetensors "
                     f"(this project), {SAE_LENS_CFG} + {SAE_LENS_WEIGHTS} (SAELens), {LLAMA_SCOPE_CFG} + "
                     f"checkpoints/final.safetensors (Llama Scope release), config.json with sae_type + sae_weights.safetensors "
                     f"(llamascopium), {SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (sparsify) or a Goodfire .pth file")


def load_sae(path: str | Path, *, format: str | None = None, site: Any = None, model_name: str | None = None,
             dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> SparseAutoencoder:
    """Load an SAE from any supported layout (detected unless ``format`` is given).

    site / model_name: fill in what the file does not say (Goodfire files name neither); contradicting
    what it does say is an error. dtype: convert the weights (e.g. torch.float32 for a bf16 release).
    """
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not one of {FORMATS}")
    p = Path(path)
    loader = {"llama3-sae": SparseAutoencoder.load, "sae_lens": _load_sae_lens, "llama_scope": _load_llama_scope,
              "llamascopium": _load_llamascopium, "sparsify": _load_sparsify, "goodfire": _load_goodfire}[fmt]
    with warnings.catch_warnings():
        if site is not None:  # the caller already says where it goes
            warnings.filterwarnings("ignore", message=".*has no equivalent site.*")
            warnings.filterwarnings("ignore", message=".*inferred site.*")
        sae = loader(p)
    inferred = set(sae.cfg.source.get("inferred_from_file_name", ()))  # a guess the caller may correct
    if site is not None:
        wanted = canonical_site(site)
        if sae.cfg.site is not None and sae.cfg.site != wanted and "site" not in inferred:
            raise ValueError(f"{p} says the SAE reads {sae.cfg.site}, but site={wanted!r} was given")
        sae.cfg = sae.cfg.replace(site=wanted)
    if model_name is not None:
        if sae.cfg.model_name not in (None, model_name) and "model_name" not in inferred:
            raise ValueError(f"{p} says the SAE belongs to {sae.cfg.model_name!r}, but model_name={model_name!r} was given")
        sae.cfg = sae.cfg.replace(model_name=model_name)
    if dtype is not None:
        sae = _convert_dtype(sae, dtype)
    if device is not None:
        sae = sae.to(device)
    return sae


def _convert_dtype(sae: SparseAutoencoder, dtype: torch.dtype | str) -> SparseAutoencoder:
    name = dtype if isinstance(dtype, str) else {v: k for k, v in DTYPES.items()}.get(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if name == sae.cfg.dtype:
        return sae
    out = SparseAutoencoder(sae.cfg.replace(dtype=name), seed=None)
    state = {k: (v.to(DTYPES[name]) if isinstance(getattr(sae, k, None), torch.nn.Parameter) else v)
             for k, v in sae.state_dict().items()}
    out.load_state_dict(state)
    return out


__all__ = ["FORMATS", "detect_format", "export_sae_lens", "hook_name_to_site", "load_sae", "site_to_hook_name"]
