"""SAELens (``cfg.json`` + ``sae_weights.safetensors``): reading its SAEs and transcoders, writing ours in its layout."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from llama3_sae.files import atomic_path, atomic_write_text

from ..config import SAEConfig
from ..io import read_safetensors
from ..model import SparseAutoencoder
from .common import (_build, _dtype_name, _is_unit_norm, _need, _norm_weight_note, _read_json, _site_of_hook,
                     _transcoder_site, site_to_hook_name)

SAE_LENS_CFG, SAE_LENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"


_SAE_LENS_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


def _load_sae_lens(path: Path) -> SparseAutoencoder:
    """SAELens 6 (and pre-6 configs), computed as its inference classes (``SAE.load_from_disk``) compute.

    Checked against sae-lens 6.54 in tests/test_interop.py. The math, with xin = norm_in(x) - b_dec (the
    subtraction only with apply_b_dec_to_input) and n_i = ||W_dec[i]||:

    * standard: relu(xin W_enc + b_enc); topk: top k of pre (times n_i with rescale_acts_by_decoder_norm),
      relu, and decode divides by n_i again; jumprelu: relu(pre) * (pre > threshold);
    * gated: (xin W_enc + b_gate > 0) * relu(xin (W_enc * exp(r_mag)) + b_mag) -- a JumpReLU on the
      magnitude pre-activation with threshold b_mag - b_gate * exp(r_mag), which is how it is stored here;
    * decode: norm_out(f W_dec + b_dec); normalize_activations "constant_norm_rescale" scales by
      sqrt(d_in) / ||x|| per token, "layer_norm" standardises with eps 1e-5;
    * transcoders: encode has no b_dec subtraction, decode no norm_out, and the skip classes add x W_skip^T
      (raw x) in ``forward`` only.

    ``encode`` returns SAELens's ``encode`` values (for topk with rescale_acts_by_decoder_norm, codes times n_i).
    """
    where = str(path / SAE_LENS_CFG)
    raw = _read_json(path / SAE_LENS_CFG)
    meta = raw.get("metadata") or raw.get("meta") or {}
    tensors = read_safetensors(path / SAE_LENS_WEIGHTS)
    _need(tensors, ("W_enc", "W_dec", "b_dec"), where)
    W_enc, W_dec = tensors["W_enc"], tensors["W_dec"]
    d_in, d_sae = W_enc.shape
    if raw.get("d_in", d_in) != d_in or raw.get("d_sae", d_sae) != d_sae:
        raise ValueError(f"{where}: d_in={raw.get('d_in')} d_sae={raw.get('d_sae')} disagree with W_enc {tuple(W_enc.shape)}")
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    if raw.get("reshape_activations", "none") != "none" or str(hook or "").endswith("hook_z"):
        raise ValueError(f"{where}: attention hook_z SAEs read per-head outputs before W_O; there is no such site here")
    arch = raw.get("architecture", "standard")
    transcoder = arch in _SAE_LENS_TRANSCODERS
    if transcoder and (raw.get("d_out", W_dec.shape[1]) != d_in or W_dec.shape[1] != d_in):
        raise ValueError(f"{where}: a transcoder from width {d_in} to {raw.get('d_out', W_dec.shape[1])}; this "
                         "model's MLP maps d_model to d_model, so only d_out == d_in transcoders can be spliced")
    if tuple(W_dec.shape) != (d_sae, d_in):
        raise ValueError(f"{where}: W_dec has shape {tuple(W_dec.shape)}, expected {(d_sae, d_in)}")
    activation, k, threshold, W_enc_rows, b_enc, W_dec, rescaled = _sae_lens_encoder(raw, tensors, arch, where)
    normalization, eps = _sae_lens_normalization(raw, transcoder, where)

    ours = raw.get("llama3_sae") or {}
    hook_out = meta.get("hook_name_out") or raw.get("hook_name_out")
    if ours.get("site"):
        site = ours["site"]
    elif transcoder:
        site = _transcoder_site(hook, hook_out, where)
    else:
        site = _site_of_hook(hook, where)
    skip = "W_skip" in tensors
    cfg = SAEConfig(d_model=int(d_in), n_latents=int(d_sae), architecture=activation, k=k,
                    apply_b_pre_to_input=bool(raw.get("apply_b_dec_to_input", True)) and not transcoder,
                    decoder_unit_norm=_is_unit_norm(W_dec), normalization=normalization, norm_eps=eps,
                    skip_connection=skip, site=site, model_name=meta.get("model_name") or raw.get("model_name"),
                    prepend_bos=meta.get("prepend_bos") if isinstance(meta.get("prepend_bos"), bool) else None,
                    dtype=_dtype_name(W_enc, where),
                    source={"format": "sae_lens", "path": str(path), "architecture": arch, "hook_name": hook,
                            **({"hook_name_out": hook_out} if transcoder else {}),
                            **({} if ours.get("site") else _norm_weight_note(hook)),
                            "code_scale": "SAELens encode" + (" (relu pre-activation times ||W_dec[i]||: "
                                                              "rescale_acts_by_decoder_norm)" if rescaled else "")})
    return _build(cfg, W_enc=W_enc_rows, b_enc=b_enc, W_dec=W_dec, b_pre=tensors["b_dec"], threshold=threshold,
                  where=where, extra={"W_skip": tensors["W_skip"]} if skip else None)


def _sae_lens_encoder(raw: dict[str, Any], tensors: dict[str, torch.Tensor], arch: str, where: str):
    """(activation, k, threshold, encoder rows [L, d], encoder bias, decoder, rescaled) in our terms."""
    W_enc, W_dec = tensors["W_enc"], tensors["W_dec"]
    act_fn = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
    threshold, k = None, None
    if arch == "topk" or (arch == "standard" and act_fn == "topk"):
        k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int):
            raise ValueError(f"{where}: a topk SAE needs an integer k (found {k!r})")
        activation = "topk"
    elif arch in ("standard", "transcoder", "skip_transcoder") and act_fn == "relu":
        activation = "relu"
    elif arch in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
        _need(tensors, ("threshold",), where)
        activation, threshold = "jumprelu", tensors["threshold"]
    elif arch == "gated":
        _need(tensors, ("b_gate", "r_mag", "b_mag"), where)
        activation = "jumprelu"
    else:
        raise ValueError(f"{where}: architecture={arch!r} (activation {act_fn!r}) is not supported; supported: "
                         f"standard (relu), topk, jumprelu, gated, {', '.join(_SAE_LENS_TRANSCODERS)}")
    W_enc_rows = W_enc.t()
    if arch == "gated":
        # gate_i > 0  <=>  g_i > -b_gate_i  <=>  g_i exp(r_i) + b_mag_i > b_mag_i - b_gate_i exp(r_i), g = xin W_enc.
        r = tensors["r_mag"].double().exp()
        W_enc_rows = (W_enc.double().t() * r[:, None]).to(W_enc.dtype)
        b_enc = tensors["b_mag"]
        threshold = tensors["b_mag"].double() - tensors["b_gate"].double() * r
    else:
        b_enc = tensors.get("b_enc", torch.zeros(W_enc.shape[1], dtype=W_enc.dtype))
    # Old SAELens scaled the code by a learned vector before decoding; fold it into the decoder.
    scale = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scale is not None:
        W_dec = W_dec * scale[:, None]
    rescaled = bool(raw.get("rescale_acts_by_decoder_norm", False)) and activation == "topk"
    if rescaled:
        # The code is multiplied by ||W_dec[i]|| before the activation and divided by it before decoding:
        # the same function as encoder rows scaled by the norm and a unit-norm decoder.
        n = W_dec.float().norm(dim=1).to(W_dec.dtype)
        W_enc_rows, b_enc, W_dec = W_enc_rows * n[:, None], b_enc * n, W_dec / n[:, None]
    return activation, k, threshold, W_enc_rows, b_enc, W_dec, rescaled


def _sae_lens_normalization(raw: dict[str, Any], transcoder: bool, where: str) -> tuple[str, float]:
    """SAELens's normalize_activations -> (our normalization, its eps)."""
    norm_kind = raw.get("normalize_activations", "none")
    if isinstance(norm_kind, bool):
        norm_kind = "expected_average_only_in" if norm_kind else "none"
    if norm_kind in ("none", None):
        return "none", 1e-6
    if norm_kind == "expected_average_only_in":
        # SAELens itself applies nothing at inference for this setting; the scale is folded into the
        # weights when it is known (from_pretrained) and is not stored in the files.
        warnings.warn(f"{where}: normalize_activations='expected_average_only_in' is not applied at inference by "
                      "SAELens either; make sure the dataset scale was folded into these weights", stacklevel=4)
        return "none", 1e-6
    if transcoder:
        raise ValueError(f"{where}: a transcoder with normalize_activations={norm_kind!r}: SAELens normalises its "
                         "input but not its output, which this SAE cannot represent (supported for transcoders: none)")
    if norm_kind == "layer_norm":
        # SAELens: (x - mean) / (std + 1e-5) in, y * std + mean out (ours undoes with std + eps: 1e-5 relative).
        return "per_token", 1e-5
    if norm_kind == "constant_norm_rescale":
        return "per_token_rms", 1e-6  # x * sqrt(d_in) / ||x|| in, y / that out
    raise ValueError(f"{where}: normalize_activations={norm_kind!r} is not supported (supported: none, "
                     "expected_average_only_in, layer_norm, constant_norm_rescale)")


def export_sae_lens(sae: SparseAutoencoder, path: str | Path, *, hook_name: str | None = None,
                    hook_name_out: str | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` in SAELens 6's layout, so that SAELens's own
    ``SAE.load_from_disk`` (and tools that read it, such as Neuronpedia uploads) computes the same function
    and names the same hook and model (checked against sae-lens 6.54 in tests/test_interop.py).

    A "dataset" normalisation and decoder-norm ranking are folded into the weights; "per_token" becomes
    SAELens's ``layer_norm`` and "per_token_rms" its ``constant_norm_rescale``. BatchTopK exports as jumprelu
    with its learned thresholds. A transcoder becomes one of SAELens's transcoder classes (hook names needed:
    our mlp_in is after the RMSNorm weight, which no TransformerLens hook is).

    Code scale: with decoder-norm ranking, SAELens reports each code times ||W_dec[i]|| in the activations'
    units (what ``sae.encode(x, scale="decoder_norm")`` returns here); otherwise the codes themselves.
    """
    from safetensors.torch import save_file

    cfg = sae.cfg
    hook_name, arch = _export_target(sae, hook_name, hook_name_out)
    tensors = _export_tensors(sae, arch)
    normalize = {"none": "none", "dataset": "none", "per_token": "layer_norm",
                 "per_token_rms": "constant_norm_rescale"}[cfg.normalization]
    if cfg.normalization == "per_token" and cfg.norm_eps != 1e-5:
        warnings.warn(f"SAELens's layer_norm uses eps=1e-5; this SAE was trained with norm_eps={cfg.norm_eps}, so "
                      "SAELens's outputs will differ slightly", stacklevel=2)
    metadata: dict[str, Any] = {"model_name": cfg.model_name, "hook_name": hook_name, "hook_head_index": None,
                                "prepend_bos": cfg.prepend_bos, "sae_lens_version": "6.0.0",
                                "sae_lens_training_version": "llama3-sae"}
    if cfg.is_transcoder:
        metadata["hook_name_out"] = hook_name_out
    out_cfg: dict[str, Any] = {
        "d_in": cfg.d_model, "d_sae": cfg.n_latents, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_pre_to_input, "normalize_activations": normalize,
        "reshape_activations": "none",
        # SAELens 6 reads this block as "metadata"; without it a file counts as a pre-6.0 config.
        "metadata": metadata,
        **({"d_out": cfg.d_model} if cfg.is_transcoder else {}),
        **({"k": cfg.k, "rescale_acts_by_decoder_norm": False} if arch == "topk" else {}),
        "architecture": arch,
        # Ignored by SAELens (it keeps only known fields); lets load_sae restore the exact site.
        "llama3_sae": {"site": cfg.site, "config": cfg.to_dict()},
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / SAE_LENS_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(path / SAE_LENS_CFG, json.dumps(out_cfg, indent=2) + "\n")
    return path


def _export_target(sae: SparseAutoencoder, hook_name: str | None, hook_name_out: str | None) -> tuple[str, str]:
    """(hook name, SAELens architecture) for ``sae``, or a ValueError saying what SAELens cannot hold."""
    cfg = sae.cfg
    if cfg.is_transcoder:
        if hook_name is None or hook_name_out is None:
            layer = cfg.site[1:-2]
            raise ValueError(f"a transcoder's input is our mlp_in, after the RMSNorm weight, which no TransformerLens "
                             f"hook is; pass hook_name=... and hook_name_out=... (e.g. 'blocks.{layer}.hook_mlp_out' for "
                             "the output) to export anyway")
        if cfg.apply_b_pre_to_input:
            raise ValueError("SAELens transcoders do not subtract the decoder bias from their input; this one does")
        if cfg.normalization in ("per_token", "per_token_rms"):
            raise ValueError("SAELens transcoders normalise their input but not their output; this transcoder's "
                             f"{cfg.normalization!r} normalisation has no SAELens equivalent")
    elif cfg.skip_connection:
        raise ValueError("SAELens has skip connections only for transcoders; this SAE has one")
    if hook_name is None:
        if cfg.site is None:
            raise ValueError("this SAE has no site; pass hook_name=... (e.g. 'blocks.15.hook_resid_post')")
        try:
            hook_name = site_to_hook_name(cfg.site)
        except ValueError as e:
            raise ValueError(f"{e}; pass hook_name=... explicitly to export anyway") from None
    arch = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[cfg.architecture]
    if cfg.is_transcoder:
        if arch == "topk":
            raise ValueError("SAELens has no TopK transcoder class; convert it to JumpReLU first "
                             "(sae.topk_to_jumprelu) or export it to another library")
        arch = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[arch]
        if cfg.skip_connection:
            arch = arch.replace("transcoder", "skip_transcoder")
    return hook_name, arch


@torch.no_grad()
def _export_tensors(sae: SparseAutoencoder, arch: str) -> dict[str, torch.Tensor]:
    """Our weights in SAELens's layout and conventions, folds done in float64."""
    cfg = sae.cfg
    W_enc, b_enc, W_dec, b_pre = (t.double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre))  # [L, d] rows
    if cfg.normalization == "dataset":
        # pre = s_in W_enc (x - mu) - W_enc b_pre [if applied] + b_enc; x_hat = (W_dec^T h + b_pre) / s_out + mu.
        mu, s_in, s_out = sae.norm_shift.double(), float(sae.norm_in_scale), float(sae.norm_out_scale)
        enc_bias = b_enc - s_in * (W_enc @ mu) - (W_enc @ b_pre if cfg.apply_b_pre_to_input else 0)
        W_enc = W_enc * s_in
        W_dec = W_dec / s_out
        b_dec = b_pre / s_out + mu
        # SAELens computes (x - b_dec [if apply]) @ W_enc + b_enc.
        b_enc = enc_bias + (W_enc @ b_dec if cfg.apply_b_pre_to_input else 0)
    else:
        b_dec = b_pre
    if cfg.architecture == "topk" and cfg.rank_by_decoder_norm:
        n = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
    dt = cfg.torch_dtype
    tensors = {"W_enc": W_enc.t().to(dt).contiguous(), "W_dec": W_dec.to(dt).contiguous(),
               "b_enc": b_enc.to(dt).contiguous(), "b_dec": b_dec.to(dt).contiguous()}
    if arch.startswith("jumprelu"):
        tensors["threshold"] = sae.threshold.to(dt).contiguous()
    if cfg.skip_connection:
        tensors["W_skip"] = sae.W_skip.detach().to(dt).contiguous()
    return tensors
