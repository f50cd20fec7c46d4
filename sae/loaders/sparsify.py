"""EleutherAI sparsify (``cfg.json`` + ``sae.safetensors`` in a directory named for its hookpoint)."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..config import SAEConfig
from ..io import read_safetensors
from ..model import SparseAutoencoder
from .common import _HF_RE, _TL_RE, _build, _dtype_name, _is_unit_norm, _need, _read_json, _site_of_hook

SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"


def _load_sparsify(path: Path) -> SparseAutoencoder:
    """EleutherAI sparsify (``SparseCoder.save_to_disk``), computed as its ``forward`` does (checked against
    eai-sparsify 1.3.3): pre = relu(encoder(x - b_dec)) (no b_dec subtraction for a transcoder), top k,
    x_hat = sum of top_acts * W_dec rows + b_dec, plus x W_skip^T (raw x) with a skip connection. The hookpoint
    is the directory name: a module's output for an SAE; its input -> its output for a transcoder."""
    where = str(path / SPARSIFY_CFG)
    raw = _read_json(path / SPARSIFY_CFG)
    if raw.get("activation", "topk") != "topk":
        raise ValueError(f"{where}: activation={raw.get('activation')!r}; only topk sparsify SAEs are supported")
    if raw.get("multi_topk"):
        warnings.warn(f"{where}: multi_topk=true changes only sparsify's training loss; inference uses k={raw.get('k')}",
                      stacklevel=3)
    tensors = read_safetensors(path / SPARSIFY_WEIGHTS)
    transcode, skip = bool(raw.get("transcode")), bool(raw.get("skip_connection"))
    _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec", *(("W_skip",) if skip else ())), where)
    enc_w = tensors["encoder.weight"]
    n_latents, d_in = enc_w.shape
    expected = raw.get("num_latents") or d_in * raw.get("expansion_factor", n_latents // d_in)
    if raw.get("d_in", d_in) != d_in or expected != n_latents:
        raise ValueError(f"{where}: d_in={raw.get('d_in')} num_latents={expected} disagree with encoder.weight "
                         f"{tuple(enc_w.shape)}")
    # sparsify saves each hookpoint in a directory named after it (e.g. layers.10, layers.10.mlp).
    site = None
    if transcode:
        m = _HF_RE.match(path.name)
        if m and m.group(2) == "mlp":
            site = f"L{int(m.group(1))}TC"
        else:
            warnings.warn(f"{where}: a transcoder whose directory name {path.name!r} is not an MLP hookpoint "
                          "(layers.L.mlp); its site is left unknown (pass site=..., e.g. L6TC)", stacklevel=3)
    elif _HF_RE.match(path.name) or _TL_RE.match(path.name):
        site = _site_of_hook(path.name, where)
    cfg = SAEConfig(d_model=int(d_in), n_latents=int(n_latents), architecture="topk", k=int(raw["k"]),
                    apply_b_pre_to_input=not transcode, decoder_unit_norm=_is_unit_norm(tensors["W_dec"]),
                    skip_connection=skip, site=site, model_name=raw.get("model"), dtype=_dtype_name(enc_w, where),
                    source={"format": "sparsify", "path": str(path), "hookpoint": path.name,
                            "transcode": transcode, "code_scale": "sparsify top_acts"})
    return _build(cfg, W_enc=enc_w, b_enc=tensors["encoder.bias"], W_dec=tensors["W_dec"], b_pre=tensors["b_dec"],
                  where=where, extra={"W_skip": tensors["W_skip"]} if skip else None)
