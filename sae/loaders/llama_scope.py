"""Llama Scope: the published release layout (lm-saes 1.x, ``hyperparams.json``) and the current library's
(llamascopium 2.x, ``config.json`` with ``sae_type``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import SAEConfig
from ..io import read_safetensors
from ..model import SparseAutoencoder
from .common import _build, _dtype_name, _is_unit_norm, _need, _norm_weight_note, _read_json, _site_of_hook, _transcoder_site

LLAMA_SCOPE_CFG = "hyperparams.json"


# --------------------------------------------------------------------------- release layout (lm-saes 1.x)
LLAMA_SCOPE_WEIGHT_FILES = ("sae_weights.safetensors", "checkpoints/pruned.safetensors", "checkpoints/final.safetensors")
"""Where lm-saes 1.x ``from_pretrained`` and llamascopium's ``from_local`` look for weights, in their order (their
.pt variants are pickles: not read)."""


def _llama_scope_weights(path: Path) -> Path | None:
    return next((path / f for f in LLAMA_SCOPE_WEIGHT_FILES if (path / f).is_file()), None)


def _fold_lm_saes_1x(hp: dict, enc_w: torch.Tensor, enc_b: torch.Tensor, dec_w: torch.Tensor, b_dec: torch.Tensor,
                     where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """lm-saes 1.x's two folds, in float64: (W_enc [L, d], b_enc, W_dec [d, L], b_dec, the norm factors)."""
    W_enc, b_enc, W_dec, b_dec = enc_w.double(), enc_b.double(), dec_w.double(), b_dec.double()
    norm_mode = hp.get("norm_activation", "token-wise")
    factors: dict[str, float] = {}
    if norm_mode == "dataset-wise":  # standardize_parameters_of_dataset_activation_scaling
        avg = hp.get("dataset_average_activation_norm") or {}
        if not {"in", "out"} <= set(avg) or not all(float(avg[k]) > 0 for k in ("in", "out")):
            raise ValueError(f"{where}: norm_activation='dataset-wise' needs dataset_average_activation_norm "
                             f"with positive 'in' and 'out' (found {avg!r})")
        root = math.sqrt(W_enc.shape[1])
        s_in, s_out = root / float(avg["in"]), root / float(avg["out"])
        b_enc, b_dec, W_dec = b_enc / s_in, b_dec / s_out, W_dec * (s_in / s_out)
        factors = {"in": s_in, "out": s_out}
    elif norm_mode not in ("inference", "none"):
        raise ValueError(f"{where}: norm_activation={norm_mode!r} is not supported: lm-saes 1.x returns such an "
                         "SAE's reconstruction in its normalised space (supported: dataset-wise, inference, none)")
    if hp.get("sparsity_include_decoder_norm", True):  # transform_to_unit_decoder_norm
        n = W_dec.norm(dim=0)
        W_dec, W_enc, b_enc = W_dec / n, W_enc * n[:, None], b_enc * n
    return W_enc, b_enc, W_dec, b_dec, factors


def _lm_saes_activation(hp: dict, where: str) -> tuple[str, int | None, float]:
    """(architecture, k, threshold) as lm-saes 1.x runs it at inference."""
    act = str(hp.get("act_fn", "relu")).lower()
    threshold = float(hp.get("jump_relu_threshold", 0.0))
    if act == "topk" and threshold > 0:
        act = "jumprelu"  # lm-saes converts it for inference: latents become independent of each other
    if act == "jumprelu":
        if threshold < 0:
            raise ValueError(f"{where}: jump_relu_threshold={threshold} is negative; lm-saes would then pass "
                             "negative codes, which this SAE cannot represent")
        return "jumprelu", None, threshold
    if act == "topk":
        return "topk", int(hp.get("top_k", 50)), threshold
    if act == "relu":
        return "relu", None, threshold
    raise ValueError(f"{where}: act_fn={act!r} is not supported (jumprelu, topk, relu)")


def _load_llama_scope(path: Path) -> SparseAutoencoder:
    """The published Llama Scope layout, computed as lm-saes 1.x's ``SparseAutoEncoder.from_pretrained`` does.

    lm-saes 1.x (read at OpenMOSS/Language-Model-SAEs v1.1.0, e20105818d97) folds two things into the
    weights *before* it applies ``jump_relu_threshold``:

    * dataset-wise norm, s_in = sqrt(d)/avg_in and s_out = sqrt(d)/avg_out: encoder.bias /= s_in,
      decoder.bias /= s_out, decoder.weight *= s_in / s_out; the input is then used unscaled;
    * with ``sparsity_include_decoder_norm``, each latent's decoder column norm n_i (after the first fold):
      decoder column /= n_i, encoder row and bias *= n_i.

    So the threshold compares codes in raw activation units times n_i, not in the normalised space the SAE
    was trained in, and ``encode`` returns those codes. A TopK SAE with a positive ``jump_relu_threshold`` is
    a JumpReLU at inference, as there.
    """
    where = str(path / LLAMA_SCOPE_CFG)
    hp = _read_json(path / LLAMA_SCOPE_CFG)
    weights = _llama_scope_weights(path)
    if weights is None:
        raise ValueError(f"{path}: no weights; lm-saes looks for {list(LLAMA_SCOPE_WEIGHT_FILES)}")
    tensors = read_safetensors(weights)
    _need(tensors, ("encoder.weight", "encoder.bias", "decoder.weight"), where)
    enc_w, enc_b, dec_w = tensors["encoder.weight"], tensors["encoder.bias"], tensors["decoder.weight"]
    d_sae, d_model = enc_w.shape
    if hp.get("d_model", d_model) != d_model or hp.get("d_sae", d_sae) != d_sae or tuple(dec_w.shape) != (d_model, d_sae):
        raise ValueError(f"{where}: d_model={hp.get('d_model')} d_sae={hp.get('d_sae')} disagree with encoder.weight "
                         f"{tuple(enc_w.shape)} / decoder.weight {tuple(dec_w.shape)}")
    if hp.get("use_glu_encoder"):
        raise ValueError(f"{where}: use_glu_encoder=true (a gated-linear encoder) is not supported")
    hook_in = hp.get("hook_point_in", "blocks.0.hook_resid_pre")
    hook_out = hp.get("hook_point_out") or hook_in
    use_bias = hp.get("use_decoder_bias", True)
    b_dec = tensors.get("decoder.bias") if use_bias else torch.zeros(d_model, dtype=dec_w.dtype)
    if b_dec is None:
        raise ValueError(f"{where}: use_decoder_bias is set but {weights.name} has no decoder.bias")

    norm_mode = hp.get("norm_activation", "token-wise")
    decoder_norm_folded = bool(hp.get("sparsity_include_decoder_norm", True))
    W_enc, b_enc, W_dec, b_dec, factors = _fold_lm_saes_1x(hp, enc_w, enc_b, dec_w, b_dec, where)
    activation, k, threshold = _lm_saes_activation(hp, where)

    lm_cfg = _read_json(path / "lm_config.json") if (path / "lm_config.json").is_file() else {}
    transcoder = hook_in != hook_out
    site = _transcoder_site(hook_in, hook_out, where) if transcoder else _site_of_hook(hook_in, where)
    cfg = SAEConfig(d_model=int(d_model), n_latents=int(d_sae), architecture=activation, k=k,
                    apply_b_pre_to_input=bool(use_bias and hp.get("apply_decoder_bias_to_pre_encoder", True)),
                    decoder_unit_norm=_is_unit_norm(W_dec.t()), normalization="none", site=site,
                    model_name=hp.get("model_name") or lm_cfg.get("model_name"),
                    dtype=_dtype_name(enc_w, where),
                    source={"format": "llama_scope", "path": str(path), "weights": str(weights.relative_to(path)),
                            "hook_point_in": hook_in, "hook_point_out": hook_out, "norm_activation": norm_mode,
                            **_norm_weight_note(hook_in),
                            "norm_factors_folded": factors, "decoder_norm_folded": decoder_norm_folded,
                            "threshold_space": "raw activation units (after folding, as lm-saes 1.x)",
                            "code_scale": "lm-saes 1.x from_pretrained: raw activation units"
                                          + (" times the decoder column norm" if decoder_norm_folded else "")})
    return _build(cfg, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec.t(), b_pre=b_dec,
                  threshold=torch.tensor(threshold) if activation == "jumprelu" else None, where=where)


# --------------------------------------------------------------------------- llamascopium 2.x
LLAMASCOPIUM_CFG = "config.json"


def _is_llamascopium(path: Path) -> bool:
    cfg = path / LLAMASCOPIUM_CFG
    if not cfg.is_file() or _llama_scope_weights(path) is None:
        return False
    try:
        raw = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(raw, dict) and "sae_type" in raw


def _load_llamascopium(path: Path) -> SparseAutoencoder:
    """llamascopium 2.x (the current Llama Scope library), as its pipeline computes (checked against
    llamascopium 2.0.0b34): the input is multiplied by its norm factor s_in, pre = x_n W_E + b_E, the
    activation ranks or thresholds g = pre * ||W_D[i]|| (with sparsity_include_decoder_norm), ``encode``
    returns g / ||W_D[i]||, decode is f W_D + b_D, divided by s_out. So a JumpReLU threshold theta_i on g is
    theta_i / ||W_D[i]|| on the code, and codes are in the normalised space.

    norm_activation: dataset-wise (s = sqrt(d) / the stored average norm, per hook), token-wise (sqrt(d) /
    ||x|| per token, SAEs only) or inference (s = 1: the norms were folded in). A file whose weights were
    folded by its trainer while its config still says dataset-wise looks exactly like an unfolded one; it is
    read as the config says, as llamascopium does.
    """
    where = str(path / LLAMASCOPIUM_CFG)
    raw = _read_json(path / LLAMASCOPIUM_CFG)
    if raw.get("sae_type") != "sae":
        raise ValueError(f"{where}: sae_type={raw.get('sae_type')!r}; only 'sae' (SAEs and transcoders) is supported, "
                         "not crosscoders, CLTs, LoRSA or MoLT")
    if raw.get("use_glu_encoder"):
        raise ValueError(f"{where}: use_glu_encoder=true (a gated-linear encoder) is not supported")
    weights = _llama_scope_weights(path)
    tensors = read_safetensors(weights)
    _need(tensors, ("W_E", "b_E", "W_D"), where)
    W_E, b_E, W_D = tensors["W_E"], tensors["b_E"], tensors["W_D"]
    d_model, d_sae = W_E.shape
    want_sae = int(raw.get("d_model", d_model) * raw.get("expansion_factor", d_sae / d_model))
    if raw.get("d_model", d_model) != d_model or want_sae != d_sae or tuple(W_D.shape) != (d_sae, d_model):
        raise ValueError(f"{where}: d_model={raw.get('d_model')} expansion_factor={raw.get('expansion_factor')} disagree "
                         f"with W_E {tuple(W_E.shape)} / W_D {tuple(W_D.shape)}")
    b_D = tensors.get("b_D") if raw.get("use_decoder_bias", True) else torch.zeros(d_model, dtype=W_D.dtype)
    if b_D is None:
        raise ValueError(f"{where}: use_decoder_bias is set but {weights.name} has no b_D")
    hook_in = raw.get("hook_point_in")
    hook_out = raw.get("hook_point_out") or hook_in
    transcoder = hook_in != hook_out
    include_dn = bool(raw.get("sparsity_include_decoder_norm", True))
    activation, k, threshold = _llamascopium_activation(raw, tensors, include_dn, where)
    normalization, norm, factors = _llamascopium_norm(raw, tensors, hook_in, hook_out, d_model, where)
    norm_mode = raw.get("norm_activation", "dataset-wise")
    dtype_name = raw.get("dtype")
    site = _transcoder_site(hook_in, hook_out, where) if transcoder else _site_of_hook(hook_in, where)
    cfg = SAEConfig(d_model=int(d_model), n_latents=int(d_sae), architecture=activation, k=k,
                    rank_by_decoder_norm=activation == "topk" and include_dn, apply_b_pre_to_input=False,
                    decoder_unit_norm=_is_unit_norm(W_D), normalization=normalization, site=site,
                    model_name=raw.get("model_name"), dtype=_dtype_name(W_E, where),
                    source={"format": "llamascopium", "path": str(path), "weights": str(weights.relative_to(path)),
                            "hook_point_in": hook_in, "hook_point_out": hook_out, "norm_activation": norm_mode,
                            "norm_factors": factors, **_norm_weight_note(hook_in),
                            **({"dtype_in_config": dtype_name} if dtype_name else {}),
                            "threshold_space": "the code (g / ||W_D[i]||) in the normalised space",
                            "code_scale": "llamascopium encode on normalised input"})
    return _build(cfg, W_enc=W_E.t(), b_enc=b_E, W_dec=W_D, b_pre=b_D, threshold=threshold, where=where, norm=norm)


def _llamascopium_activation(raw: dict, tensors: dict[str, torch.Tensor], include_dn: bool, where: str):
    """(architecture, k, per-latent threshold on our code) for llamascopium's act_fn."""
    act = str(raw.get("act_fn", "relu")).lower()
    if act == "jumprelu":
        _need(tensors, ("activation_function.log_jumprelu_threshold",), where)
        W_D = tensors["W_D"]
        theta = tensors["activation_function.log_jumprelu_threshold"].to(W_D.dtype).exp().double()
        return "jumprelu", None, theta / W_D.double().norm(dim=1) if include_dn else theta
    if act == "topk":
        return "topk", int(raw.get("top_k", 50)), None
    if act == "relu":
        return "relu", None, None
    raise ValueError(f"{where}: act_fn={act!r} is not supported (relu, jumprelu, topk); batchtopk SAEs select "
                     "over the whole batch at inference in llamascopium, so a token's code depends on the others")


def _llamascopium_norm(raw: dict, tensors: dict[str, torch.Tensor], hook_in: str, hook_out: str, d_model: int,
                       where: str) -> tuple[str, dict[str, torch.Tensor] | None, dict[str, float]]:
    """(our normalization, its buffers, the factors) for llamascopium's norm_activation."""
    norm_mode = raw.get("norm_activation", "dataset-wise")
    transcoder = hook_in != hook_out
    if norm_mode == "dataset-wise":
        prefix = "dataset_average_activation_norm."
        avg = {key[len(prefix):]: float(t) for key, t in tensors.items() if key.startswith(prefix)}
        if hook_in not in avg or hook_out not in avg or not (avg[hook_in] > 0 and avg[hook_out] > 0):
            raise ValueError(f"{where}: norm_activation='dataset-wise' needs positive dataset_average_activation_norm."
                             f"<hook> tensors for {hook_in!r} and {hook_out!r} (found {avg})")
        root = math.sqrt(d_model)
        factors = {"in": root / avg[hook_in], "out": root / avg[hook_out]}
        norm = {"norm_shift": torch.zeros(d_model), "norm_in_scale": torch.tensor(factors["in"]),
                "norm_out_scale": torch.tensor(factors["out"])}
        return "dataset", norm, factors
    if norm_mode == "inference":
        return "none", None, {}
    if norm_mode == "token-wise" and not transcoder:
        return "per_token_rms", None, {}
    raise ValueError(f"{where}: norm_activation={norm_mode!r} is not supported"
                     + (" for a transcoder (its output factor comes from the true output)" if transcoder else "")
                     + " (supported: dataset-wise, inference, token-wise for SAEs)")
