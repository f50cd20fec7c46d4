"""Goodfire's SAEs: a weights-only torch state dict (``.pt`` / ``.pth``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from ..config import SAEConfig
from ..model import SparseAutoencoder
from .common import _build, _dtype_name, _is_unit_norm

TORCH_SUFFIXES = (".pt", ".pth")
_GOODFIRE_KEYS = {"encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias"}


def _load_goodfire(path: Path) -> SparseAutoencoder:
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in TORCH_SUFFIXES)
        if len(files) != 1:
            raise ValueError(f"{path}: expected exactly one {'/'.join(TORCH_SUFFIXES)} file, found {[f.name for f in files]}")
        path = files[0]
    where = str(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; say which file and why
        raise ValueError(f"{where}: cannot read as a weights-only torch state dict: {e}") from e
    if not isinstance(state, dict) or not _GOODFIRE_KEYS <= set(state):
        keys = sorted(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where}: not a Goodfire SAE state dict (needs {sorted(_GOODFIRE_KEYS)}, found {keys})")
    enc_w, dec_w = state["encoder_linear.weight"], state["decoder_linear.weight"]
    d_hidden, d_in = enc_w.shape
    site, model_name = _goodfire_names(path)
    cfg = SAEConfig(d_model=int(d_in), n_latents=int(d_hidden), architecture="relu", k=None,
                    apply_b_pre_to_input=False, decoder_unit_norm=_is_unit_norm(dec_w.t()), site=site,
                    model_name=model_name, dtype=_dtype_name(enc_w, where),
                    source={"format": "goodfire", "path": where, "code_scale": "Goodfire's (relu of the encoder)",
                            **({"inferred_from_file_name": ["site", "model_name"]} if site else {})})
    return _build(cfg, W_enc=enc_w, b_enc=state["encoder_linear.bias"], W_dec=dec_w.t(),
                  b_pre=state["decoder_linear.bias"], where=where)


_GOODFIRE_NAME = re.compile(r"^(?P<model>.+?)-SAE-l(?P<layer>\d+)$", re.IGNORECASE)


def _goodfire_names(path: Path) -> tuple[str | None, str | None]:
    """Goodfire's files name neither site nor model, but their published names do: ``Llama-3.1-8B-Instruct-SAE-l19``
    is layer 19's residual stream output (``model.layers.19``) of meta-llama/Llama-3.1-8B-Instruct. Both are
    inferred from such a name, with a warning saying so; other names leave them unknown."""
    m = _GOODFIRE_NAME.match(path.stem)
    if m is None:
        return None, None
    site, model = f"L{int(m.group('layer'))}R", m.group("model")
    if "/" not in model and model.lower().startswith("llama"):
        model = f"meta-llama/{model}"
    warnings.warn(f"{path.name}: inferred site {site} (layer {int(m.group('layer'))}'s residual output, as Goodfire's "
                  f"published SAEs read) and model {model} from the file name; pass site=/model_name= to load_sae "
                  "(--site on the command line) if that is wrong", stacklevel=4)
    return site, model
