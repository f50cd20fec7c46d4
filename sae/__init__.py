"""Sparse autoencoders for llama3: the model, its losses, steering functions, on-disk format and loaders.

    from sae import SparseAutoencoder, load_sae
    sae = load_sae(path)            # ours, SAELens, Llama Scope (both layouts), sparsify or Goodfire
    h = sae.encode(x)               # [..., n_latents]
    x_hat = sae.decode(h)
    sae.save(path)
"""

from .config import FORMAT_VERSION, SAEConfig
from .convert import topk_to_jumprelu
from .io import read_latents, save_sae, write_latents
from .loaders import detect_format, export_sae_lens, hook_name_to_site, load_sae, site_to_hook_name
from .model import ForwardOutput, NormStats, SparseAutoencoder
from .sparse import SparseCode, sparse_decode
from .steering import Edit, bind_to_model, check_injection, reconstruct_fn, sae_hooks, steer_fn, zero_fn
from .training import DeadLatentTracker, KSchedule

__all__ = [
    "DeadLatentTracker", "Edit", "FORMAT_VERSION", "ForwardOutput", "KSchedule", "NormStats", "SAEConfig",
    "SparseAutoencoder", "SparseCode", "bind_to_model", "check_injection", "detect_format", "export_sae_lens", "hook_name_to_site",
    "load_sae", "read_latents", "reconstruct_fn", "sae_hooks", "save_sae", "site_to_hook_name", "sparse_decode",
    "steer_fn", "topk_to_jumprelu", "write_latents", "zero_fn",
]
