"""What every loader shares: hook names <-> sites, building our module from converted tensors, reading
config files with errors that name them."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from llama3_sae.sites import Site, parse_site, site_name, transcoder_site

from ..activations import ACTIVATIONS
from ..config import DTYPES, SAEConfig
from ..io import load_state
from ..model import SparseAutoencoder


# --------------------------------------------------------------------------- hook names
# TransformerLens hook names (SAELens, Llama Scope) for the sites that have an exact equivalent.
_TL_POINTS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
              "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out",
              "hook_mlp_in": "resid_mid"}  # TransformerLens's hook_mlp_in is a copy of resid_mid, before ln2
# TransformerLens's normalised inputs are taken before the RMSNorm weight (from_pretrained folds it into the next
# matmul); ours after it. Such an SAE reads our point divided by the norm weight, folded in once the model is known.
_TL_NORMALIZED = {"ln1.hook_normalized": "attn_in", "ln2.hook_normalized": "mlp_in"}
_TL_NORM_RE = re.compile(r"^blocks\.(\d+)\.(ln[12]\.hook_normalized)$")
# Hugging Face module names (sparsify hookpoints): a module's output. The HF norms include their weight,
# as our attn_in / mlp_in do.
_HF_POINTS = {None: "resid_post", "self_attn": "attn_out", "mlp": "mlp_out",
              "input_layernorm": "attn_in", "post_attention_layernorm": "mlp_in"}
_TL_RE = re.compile(r"^blocks\.(\d+)\.(hook_[a-z_]+)$")
_HF_RE = re.compile(r"^(?:model\.)?layers\.(\d+)(?:\.([a-z_]+))?$")


def hook_name_to_site(name: str):
    """``blocks.12.hook_resid_post`` (TransformerLens / SAELens / Llama Scope) or ``layers.12.mlp`` (HF
    module names, sparsify) -> ``Site``. Hooks without an equivalent here are a ValueError. TransformerLens's
    ``ln1/ln2.hook_normalized`` map to attn_in / mlp_in, which differ from them by the RMSNorm weight
    (see ``needs_norm_weight``)."""

    m = _TL_RE.match(name)
    if m and m.group(2) in _TL_POINTS:
        return Site(int(m.group(1)), _TL_POINTS[m.group(2)])
    m = _TL_NORM_RE.match(name)
    if m:
        return Site(int(m.group(1)), _TL_NORMALIZED[m.group(2)])
    m = _HF_RE.match(name)
    if m and m.group(2) in _HF_POINTS:
        return Site(int(m.group(1)), _HF_POINTS[m.group(2)])
    raise ValueError(f"hook {name!r} has no equivalent site in this model; known: blocks.L.{{{', '.join(_TL_POINTS)}}} "
                     f"and layers.L[.{{{', '.join(k for k in _HF_POINTS if k)}}}]")


def site_to_hook_name(site: Any) -> str:
    """Our site -> the TransformerLens hook name SAELens uses. attn_in/mlp_in have no exact equivalent."""

    s = parse_site(site)
    for hook, point in _TL_POINTS.items():
        if point == s.point:
            return f"blocks.{s.layer}.{hook}"
    raise ValueError(f"site {site!r} ({s.point}) has no TransformerLens hook: TransformerLens's "
                     "ln hook_normalized is taken before the RMSNorm weight, ours after it")


# --------------------------------------------------------------------------- building from raw tensors
def _build(cfg: SAEConfig, *, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_pre: torch.Tensor,
           threshold: torch.Tensor | None = None, where: str, norm: dict[str, torch.Tensor] | None = None,
           extra: dict[str, torch.Tensor] | None = None) -> SparseAutoencoder:
    L, d = cfg.n_latents, cfg.d_model
    for name, t, shape in (("encoder weight", W_enc, (L, d)), ("encoder bias", b_enc, (L,)),
                           ("decoder weight", W_dec, (L, d)), ("decoder bias", b_pre, (d,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)} after conversion, expected {shape} "
                             f"(d_model={d}, n_latents={L})")
    dt = cfg.torch_dtype
    tensors = {"W_enc": W_enc.to(dt).contiguous(), "b_enc": b_enc.to(dt), "W_dec": W_dec.to(dt).contiguous(),
               "b_pre": b_pre.to(dt)}
    if ACTIVATIONS[cfg.architecture].learns_threshold:
        if threshold is None:
            raise ValueError(f"{where}: a {cfg.architecture} SAE needs thresholds")
        # relu(pre) * (pre > t) is the same function for any t < 0 as for t = 0.
        tensors["threshold"] = threshold.float().expand(L).clamp_min(0).contiguous()
    if norm:
        tensors.update(norm)
    for name, t in (extra or {}).items():
        tensors[name] = t.to(dt).contiguous()
    sae = SparseAutoencoder(cfg, seed=None)
    load_state(sae, tensors, where=where)
    return sae


def _is_unit_norm(W_dec: torch.Tensor) -> bool:
    return bool(((W_dec.float().norm(dim=1) - 1).abs() < 1e-3).all())


def _dtype_name(t: torch.Tensor, where: str) -> str:
    for name, dt in DTYPES.items():
        if t.dtype == dt:
            return name
    raise ValueError(f"{where}: weights are {t.dtype}; supported dtypes are {sorted(DTYPES)}")


def _site_of_hook(hook: str | None, where: str) -> str | None:
    if not hook:
        return None
    try:

        return site_name(hook_name_to_site(hook))
    except ValueError as e:
        warnings.warn(f"{where}: {e}; the SAE's site is left unknown (pass site=... to load_sae)", stacklevel=3)
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def _need(tensors: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing}; found {sorted(tensors)}")


def _transcoder_site(hook_in: str | None, hook_out: str | None, where: str) -> str:
    """A transcoder's input and output hooks -> "L{L}TC": it must read block L's MLP input and write its output."""

    if not hook_in or not hook_out:
        raise ValueError(f"{where}: a transcoder needs both its input and output hook names (found {hook_in!r}, "
                         f"{hook_out!r})")
    try:
        return transcoder_site(hook_name_to_site(hook_in), hook_name_to_site(hook_out))
    except ValueError as e:
        raise ValueError(f"{where}: {hook_in} -> {hook_out}: {e}") from None


def _norm_weight_note(hook: str | None) -> dict[str, Any]:
    """Provenance for SAEs that read TransformerLens's normalised input (before the RMSNorm weight)."""
    m = _TL_NORM_RE.match(hook or "")
    return {"input_before_norm_weight": _TL_NORMALIZED[m.group(2)]} if m else {}
