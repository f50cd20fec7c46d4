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
``sae.steering.bind_to_model`` folds the model's weight into them.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from llama3_sae.sites import Site, parse_site, site_name

from .config import DTYPES, SAEConfig, canonical_site
from .io import _atomic_write, is_native_dir, load_state, read_safetensors, save_sae
from .model import SparseAutoencoder

FORMATS = ("llama3-sae", "sae_lens", "llama_scope", "llamascopium", "sparsify", "goodfire")
SAE_LENS_CFG, SAE_LENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
LLAMA_SCOPE_CFG, LLAMA_SCOPE_WEIGHTS = "hyperparams.json", "checkpoints/final.safetensors"
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
_TORCH_SUFFIXES = (".pt", ".pth")
_GOODFIRE_KEYS = {"encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias"}


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


# --------------------------------------------------------------------------- detection and dispatch
def detect_format(path: str | Path) -> str:
    """Which layout ``path`` holds, judged by its files and their contents."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        if p.suffix in _TORCH_SUFFIXES:
            return "goodfire"
        raise ValueError(f"{p} is a file; an SAE is a directory (ours, SAELens, Llama Scope, sparsify) or a "
                         f"Goodfire {'/'.join(_TORCH_SUFFIXES)} state dict")
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
    torch_files = sorted(f for f in p.iterdir() if f.suffix in _TORCH_SUFFIXES)
    if len(torch_files) == 1:
        return "goodfire"
    subdirs = sorted(d.name for d in p.iterdir() if d.is_dir() and any(
        (d / name).is_file() for name in ("cfg.json", LLAMA_SCOPE_CFG, LLAMASCOPIUM_CFG)))
    hint = f"; it holds SAEs in {subdirs[:8]}{'...' if len(subdirs) > 8 else ''}: pass one of those" if subdirs else ""
    found = sorted(f.name for f in p.iterdir())[:12]
    raise ValueError(f"{p}: no known SAE layout (files: {found}){hint}. Expected config.json + sae.safetensors "
                     f"(this project), {SAE_LENS_CFG} + {SAE_LENS_WEIGHTS} (SAELens), {LLAMA_SCOPE_CFG} + "
                     f"{LLAMA_SCOPE_WEIGHTS} (Llama Scope release), config.json with sae_type + sae_weights.safetensors "
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
    if cfg.architecture in ("jumprelu", "batchtopk"):
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


# --------------------------------------------------------------------------- SAELens
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
    W_enc, W_dec, b_dec = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    d_in, d_sae = W_enc.shape
    if raw.get("d_in", d_in) != d_in or raw.get("d_sae", d_sae) != d_sae:
        raise ValueError(f"{where}: d_in={raw.get('d_in')} d_sae={raw.get('d_sae')} disagree with W_enc {tuple(W_enc.shape)}")
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    if raw.get("reshape_activations", "none") != "none" or str(hook or "").endswith("hook_z"):
        raise ValueError(f"{where}: attention hook_z SAEs read per-head outputs before W_O; there is no such site here")

    arch = raw.get("architecture", "standard")
    act_fn = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
    transcoder = arch in _SAE_LENS_TRANSCODERS
    if transcoder:
        d_out = raw.get("d_out", W_dec.shape[1])
        if d_out != d_in or W_dec.shape[1] != d_in:
            raise ValueError(f"{where}: a transcoder from width {d_in} to {d_out}; this model's MLP maps d_model to "
                             "d_model, so only d_out == d_in transcoders can be spliced")
    if tuple(W_dec.shape) != (d_sae, d_in):
        raise ValueError(f"{where}: W_dec has shape {tuple(W_dec.shape)}, expected {(d_sae, d_in)}")
    threshold = None
    if arch == "topk" or (arch == "standard" and act_fn == "topk"):
        k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int):
            raise ValueError(f"{where}: a topk SAE needs an integer k (found {k!r})")
        activation = "topk"
    elif arch in ("standard", "transcoder", "skip_transcoder") and act_fn == "relu":
        activation, k = "relu", None
    elif arch in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
        _need(tensors, ("threshold",), where)
        activation, k, threshold = "jumprelu", None, tensors["threshold"]
    elif arch == "gated":
        _need(tensors, ("b_gate", "r_mag", "b_mag"), where)
        activation, k = "jumprelu", None
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
        b_enc = tensors.get("b_enc", torch.zeros(d_sae, dtype=W_enc.dtype))
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

    norm_kind = raw.get("normalize_activations", "none")
    if isinstance(norm_kind, bool):
        norm_kind = "expected_average_only_in" if norm_kind else "none"
    normalization, eps = "none", 1e-6
    if norm_kind in ("none", None):
        pass
    elif norm_kind == "expected_average_only_in":
        # SAELens itself applies nothing at inference for this setting; the scale is folded into the
        # weights when it is known (from_pretrained) and is not stored in the files.
        warnings.warn(f"{where}: normalize_activations='expected_average_only_in' is not applied at inference by "
                      "SAELens either; make sure the dataset scale was folded into these weights", stacklevel=3)
    elif transcoder:
        raise ValueError(f"{where}: a transcoder with normalize_activations={norm_kind!r}: SAELens normalises its "
                         "input but not its output, which this SAE cannot represent (supported for transcoders: none)")
    elif norm_kind == "layer_norm":
        # SAELens: (x - mean) / (std + 1e-5) in, y * std + mean out (ours undoes with std + eps: 1e-5 relative).
        normalization, eps = "per_token", 1e-5
    elif norm_kind == "constant_norm_rescale":
        normalization = "per_token_rms"  # x * sqrt(d_in) / ||x|| in, y / that out
    else:
        raise ValueError(f"{where}: normalize_activations={norm_kind!r} is not supported (supported: none, "
                         "expected_average_only_in, layer_norm, constant_norm_rescale)")

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
    return _build(cfg, W_enc=W_enc_rows, b_enc=b_enc, W_dec=W_dec, b_pre=b_dec, threshold=threshold, where=where,
                  extra={"W_skip": tensors["W_skip"]} if skip else None)


def _transcoder_site(hook_in: str | None, hook_out: str | None, where: str) -> str:
    """A transcoder's input and output hooks -> "L{L}TC": it must read block L's MLP input and write its output."""

    if not hook_in or not hook_out:
        raise ValueError(f"{where}: a transcoder needs both its input and output hook names (found {hook_in!r}, "
                         f"{hook_out!r})")
    a, b = hook_name_to_site(hook_in), hook_name_to_site(hook_out)
    if a.point != "mlp_in" or b.point != "mlp_out" or a.layer != b.layer:
        raise ValueError(f"{where}: a transcoder from {hook_in} ({site_name(a)}) to {hook_out} ({site_name(b)}); only "
                         "a block's MLP input -> the same block's MLP output can replace an MLP here")
    return f"L{a.layer}TC"


def _norm_weight_note(hook: str | None) -> dict[str, Any]:
    """Provenance for SAEs that read TransformerLens's normalised input (before the RMSNorm weight)."""
    m = _TL_NORM_RE.match(hook or "")
    return {"input_before_norm_weight": _TL_NORMALIZED[m.group(2)]} if m else {}


# --------------------------------------------------------------------------- Llama Scope / lm-saes 1.x
LLAMA_SCOPE_WEIGHT_FILES = ("sae_weights.safetensors", "checkpoints/pruned.safetensors", "checkpoints/final.safetensors")
"""Where lm-saes 1.x ``from_pretrained`` looks for weights, in its order (its .pt variants are pickles: not read)."""


def _llama_scope_weights(path: Path) -> Path | None:
    return next((path / f for f in LLAMA_SCOPE_WEIGHT_FILES if (path / f).is_file()), None)


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

    W_enc, b_enc, W_dec, b_dec = enc_w.double(), enc_b.double(), dec_w.double(), b_dec.double()
    norm_mode = hp.get("norm_activation", "token-wise")
    factors: dict[str, float] = {}
    if norm_mode == "dataset-wise":
        avg = hp.get("dataset_average_activation_norm") or {}
        if not {"in", "out"} <= set(avg) or not all(float(avg[k]) > 0 for k in ("in", "out")):
            raise ValueError(f"{where}: norm_activation='dataset-wise' needs dataset_average_activation_norm "
                             f"with positive 'in' and 'out' (found {avg!r})")
        root = math.sqrt(d_model)
        s_in, s_out = root / float(avg["in"]), root / float(avg["out"])
        b_enc, b_dec, W_dec = b_enc / s_in, b_dec / s_out, W_dec * (s_in / s_out)
        factors = {"in": s_in, "out": s_out}
    elif norm_mode not in ("inference", "none"):
        raise ValueError(f"{where}: norm_activation={norm_mode!r} is not supported: lm-saes 1.x returns such an "
                         "SAE's reconstruction in its normalised space (supported: dataset-wise, inference, none)")
    decoder_norm_folded = bool(hp.get("sparsity_include_decoder_norm", True))
    if decoder_norm_folded:
        n = W_dec.norm(dim=0)
        W_dec, W_enc, b_enc = W_dec / n, W_enc * n[:, None], b_enc * n

    act = str(hp.get("act_fn", "relu")).lower()
    threshold = float(hp.get("jump_relu_threshold", 0.0))
    if act == "topk" and threshold > 0:
        act = "jumprelu"  # lm-saes converts it for inference: latents become independent of each other
    k = None
    if act == "jumprelu":
        if threshold < 0:
            raise ValueError(f"{where}: jump_relu_threshold={threshold} is negative; lm-saes would then pass "
                             "negative codes, which this SAE cannot represent")
        activation = "jumprelu"
    elif act == "topk":
        activation, k = "topk", int(hp.get("top_k", 50))
    elif act == "relu":
        activation = "relu"
    else:
        raise ValueError(f"{where}: act_fn={act!r} is not supported (jumprelu, topk, relu)")

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


# --------------------------------------------------------------------------- sparsify
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


# --------------------------------------------------------------------------- llamascopium 2.x
LLAMASCOPIUM_CFG = "config.json"
LLAMASCOPIUM_WEIGHT_FILES = ("sae_weights.safetensors", "checkpoints/pruned.safetensors", "checkpoints/final.safetensors")


def _is_llamascopium(path: Path) -> bool:
    cfg = path / LLAMASCOPIUM_CFG
    if not cfg.is_file() or not any((path / f).is_file() for f in LLAMASCOPIUM_WEIGHT_FILES):
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
    weights = next(path / f for f in LLAMASCOPIUM_WEIGHT_FILES if (path / f).is_file())
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
    dn = W_D.double().norm(dim=1)

    act = str(raw.get("act_fn", "relu")).lower()
    threshold, k = None, None
    if act == "jumprelu":
        _need(tensors, ("activation_function.log_jumprelu_threshold",), where)
        theta = tensors["activation_function.log_jumprelu_threshold"].to(W_E.dtype).exp().double()
        threshold = theta / dn if include_dn else theta
        activation = "jumprelu"
    elif act == "topk":
        activation, k = "topk", int(raw.get("top_k", 50))
    elif act == "relu":
        activation = "relu"
    else:
        raise ValueError(f"{where}: act_fn={act!r} is not supported (relu, jumprelu, topk); batchtopk SAEs select "
                         "over the whole batch at inference in llamascopium, so a token's code depends on the others")

    norm_mode = raw.get("norm_activation", "dataset-wise")
    norm, factors = None, {}
    if norm_mode == "dataset-wise":
        avg = {}
        for key, t in tensors.items():
            if key.startswith("dataset_average_activation_norm."):
                avg[key.split(".", 1)[1]] = float(t)
        if hook_in not in avg or hook_out not in avg or not (avg[hook_in] > 0 and avg[hook_out] > 0):
            raise ValueError(f"{where}: norm_activation='dataset-wise' needs positive dataset_average_activation_norm."
                             f"<hook> tensors for {hook_in!r} and {hook_out!r} (found {avg})")
        root = math.sqrt(d_model)
        factors = {"in": root / avg[hook_in], "out": root / avg[hook_out]}
        norm = {"norm_shift": torch.zeros(d_model), "norm_in_scale": torch.tensor(factors["in"]),
                "norm_out_scale": torch.tensor(factors["out"])}
        normalization = "dataset"
    elif norm_mode == "inference":
        normalization = "none"
    elif norm_mode == "token-wise" and not transcoder:
        normalization = "per_token_rms"
    else:
        raise ValueError(f"{where}: norm_activation={norm_mode!r} is not supported"
                         + (" for a transcoder (its output factor comes from the true output)" if transcoder else "")
                         + " (supported: dataset-wise, inference, token-wise for SAEs)")
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


# --------------------------------------------------------------------------- Goodfire
def _load_goodfire(path: Path) -> SparseAutoencoder:
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in _TORCH_SUFFIXES)
        if len(files) != 1:
            raise ValueError(f"{path}: expected exactly one {'/'.join(_TORCH_SUFFIXES)} file, found {[f.name for f in files]}")
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


# --------------------------------------------------------------------------- export to SAELens
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

    with torch.no_grad():
        W_enc = sae.W_enc.double()  # [L, d]
        b_enc = sae.b_enc.double()
        W_dec = sae.W_dec.double()
        b_pre = sae.b_pre.double()
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
    _atomic_write(path / SAE_LENS_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    text = json.dumps(out_cfg, indent=2) + "\n"
    _atomic_write(path / SAE_LENS_CFG, lambda tmp: Path(tmp).write_text(text))
    return path


__all__ = ["FORMATS", "detect_format", "export_sae_lens", "hook_name_to_site", "load_sae", "save_sae",
           "site_to_hook_name"]
