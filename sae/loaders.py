"""``load_sae``: this project's format or a published SAE (SAELens, Llama Scope, sparsify, Goodfire), into
one ``SparseAutoencoder``; ``export_sae_lens`` writes ours in SAELens's layout.

Each foreign layout is converted once, at load time, into our parameters so that ``encode``/``decode``
compute what the original library computes:

* SAELens (``cfg.json`` + ``sae_weights.safetensors``): pre = (x - b_dec [if apply_b_dec_to_input]) @ W_enc
  + b_enc, W_enc [d_in, d_sae], W_dec [d_sae, d_in]; architectures standard (relu), topk, jumprelu.
* Llama Scope / lm-saes (``hyperparams.json`` + ``checkpoints/final.safetensors``): x is scaled by
  sqrt(d_model) / dataset_average_activation_norm["in"], pre = encoder(x) (minus decoder.bias only if
  apply_decoder_bias_to_pre_encoder), JumpReLU with a scalar ``jump_relu_threshold`` on pre, and the
  decoder output scaled back by dataset_average_activation_norm["out"] / sqrt(d_model).
* sparsify (``cfg.json`` + ``sae.safetensors``): pre = relu(encoder(x - b_dec)), TopK, x_hat = top_acts @
  W_dec + b_dec with encoder.weight and W_dec both [num_latents, d_in]. The hookpoint is the directory name.
* Goodfire (a ``.pt``/``.pth`` state dict): h = relu(encoder_linear(x)), x_hat = decoder_linear(h).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import DTYPES, SAEConfig, canonical_site
from .io import is_native_dir, load_native, load_state, read_safetensors, save_sae
from .model import SparseAutoencoder

FORMATS = ("llama3-sae", "sae_lens", "llama_scope", "sparsify", "goodfire")
SAE_LENS_CFG, SAE_LENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
LLAMA_SCOPE_CFG, LLAMA_SCOPE_WEIGHTS = "hyperparams.json", "checkpoints/final.safetensors"
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
_TORCH_SUFFIXES = (".pt", ".pth")
_GOODFIRE_KEYS = {"encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias"}


# --------------------------------------------------------------------------- hook names
# TransformerLens hook names (SAELens, Llama Scope) for the sites that have an exact equivalent.
_TL_POINTS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
              "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out"}
# Hugging Face module names (sparsify hookpoints): a module's output. The HF norms include their weight,
# as our attn_in / mlp_in do.
_HF_POINTS = {None: "resid_post", "self_attn": "attn_out", "mlp": "mlp_out",
              "input_layernorm": "attn_in", "post_attention_layernorm": "mlp_in"}
_TL_RE = re.compile(r"^blocks\.(\d+)\.(hook_[a-z_]+)$")
_HF_RE = re.compile(r"^(?:model\.)?layers\.(\d+)(?:\.([a-z_]+))?$")


def hook_name_to_site(name: str):
    """``blocks.12.hook_resid_post`` (TransformerLens / SAELens / Llama Scope) or ``layers.12.mlp`` (HF
    module names, sparsify) -> ``Site``. Hooks without an exact equivalent here are a ValueError (for
    instance TransformerLens's ``ln1.hook_normalized`` is taken before the norm's weight, ours after)."""
    from llama3.model import Site

    m = _TL_RE.match(name)
    if m and m.group(2) in _TL_POINTS:
        return Site(int(m.group(1)), _TL_POINTS[m.group(2)])
    m = _HF_RE.match(name)
    if m and m.group(2) in _HF_POINTS:
        return Site(int(m.group(1)), _HF_POINTS[m.group(2)])
    raise ValueError(f"hook {name!r} has no equivalent site in this model; known: blocks.L.{{{', '.join(_TL_POINTS)}}} "
                     f"and layers.L[.{{{', '.join(k for k in _HF_POINTS if k)}}}]")


def site_to_hook_name(site: Any) -> str:
    """Our site -> the TransformerLens hook name SAELens uses. attn_in/mlp_in have no exact equivalent."""
    from llama3.model import parse_site

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
    if (p / LLAMA_SCOPE_CFG).is_file() and (p / LLAMA_SCOPE_WEIGHTS).is_file():
        return "llama_scope"
    if (p / SPARSIFY_CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    torch_files = sorted(f for f in p.iterdir() if f.suffix in _TORCH_SUFFIXES)
    if len(torch_files) == 1:
        return "goodfire"
    subdirs = sorted(d.name for d in p.iterdir() if d.is_dir() and ((d / "cfg.json").is_file()
                                                                     or (d / LLAMA_SCOPE_CFG).is_file()))
    hint = f"; it holds SAEs in {subdirs[:8]}{'...' if len(subdirs) > 8 else ''}: pass one of those" if subdirs else ""
    found = sorted(f.name for f in p.iterdir())[:12]
    raise ValueError(f"{p}: no known SAE layout (files: {found}){hint}. Expected config.json + sae.safetensors "
                     f"(this project), {SAE_LENS_CFG} + {SAE_LENS_WEIGHTS} (SAELens), {LLAMA_SCOPE_CFG} + "
                     f"{LLAMA_SCOPE_WEIGHTS} (Llama Scope), {SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (sparsify) or a "
                     f"Goodfire .pth file")


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
    loader = {"llama3-sae": load_native, "sae_lens": _load_sae_lens, "llama_scope": _load_llama_scope,
              "sparsify": _load_sparsify, "goodfire": _load_goodfire}[fmt]
    with warnings.catch_warnings():
        if site is not None:  # the caller already says where it goes
            warnings.filterwarnings("ignore", message=".*has no equivalent site.*")
        sae = loader(p)
    if site is not None:
        wanted = canonical_site(site)
        if sae.cfg.site is not None and sae.cfg.site != wanted:
            raise ValueError(f"{p} says the SAE reads {sae.cfg.site}, but site={wanted!r} was given")
        sae.cfg = sae.cfg.replace(site=wanted)
    if model_name is not None:
        if sae.cfg.model_name is not None and sae.cfg.model_name != model_name:
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
           threshold: torch.Tensor | None = None, where: str, norm: dict[str, torch.Tensor] | None = None
           ) -> SparseAutoencoder:
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
        from llama3.model import site_name

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
def _load_sae_lens(path: Path) -> SparseAutoencoder:
    where = str(path / SAE_LENS_CFG)
    raw = _read_json(path / SAE_LENS_CFG)
    meta = raw.get("meta") or raw.get("metadata") or {}
    tensors = read_safetensors(path / SAE_LENS_WEIGHTS)
    _need(tensors, ("W_enc", "W_dec", "b_dec"), where)
    W_enc, W_dec, b_dec = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    d_in, d_sae = W_enc.shape
    if raw.get("d_in", d_in) != d_in or raw.get("d_sae", d_sae) != d_sae:
        raise ValueError(f"{where}: d_in={raw.get('d_in')} d_sae={raw.get('d_sae')} disagree with W_enc {tuple(W_enc.shape)}")
    if raw.get("reshape_activations", "none") != "none" or str(meta.get("hook_name") or raw.get("hook_name") or "").endswith("hook_z"):
        raise ValueError(f"{where}: attention hook_z SAEs read per-head outputs before W_O; there is no such site here")

    arch = raw.get("architecture", "standard")
    act_fn = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
    if arch == "topk" or (arch == "standard" and act_fn == "topk"):
        k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int):
            raise ValueError(f"{where}: a topk SAE needs an integer k (found {k!r})")
        activation = "topk"
    elif arch == "standard" and act_fn == "relu":
        activation, k = "relu", None
    elif arch == "jumprelu":
        _need(tensors, ("threshold",), where)
        activation, k = "jumprelu", None
    else:
        raise ValueError(f"{where}: architecture={arch!r} (activation {act_fn!r}) is not supported; "
                         "supported: standard (relu), topk, jumprelu")

    b_enc = tensors.get("b_enc", torch.zeros(d_sae, dtype=W_enc.dtype))
    W_enc_rows = W_enc.t()
    # Old SAELens scaled the code by a learned vector before decoding; fold it into the decoder.
    scale = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scale is not None:
        W_dec = W_dec * scale[:, None]
    if raw.get("rescale_acts_by_decoder_norm", False):
        # The code is multiplied by ||W_dec[i]|| before the activation and divided by it before decoding:
        # the same function as encoder rows scaled by the norm and a unit-norm decoder.
        n = W_dec.float().norm(dim=1).to(W_dec.dtype)
        W_enc_rows, b_enc, W_dec = W_enc_rows * n[:, None], b_enc * n, W_dec / n[:, None]

    norm_kind = raw.get("normalize_activations", "none")
    if isinstance(norm_kind, bool):
        norm_kind = "expected_average_only_in" if norm_kind else "none"
    if norm_kind in ("none", None):
        normalization, eps = "none", 1e-6
    elif norm_kind == "expected_average_only_in":
        # SAELens itself applies nothing at inference for this setting; the scale is folded into the
        # weights when it is known (from_pretrained) and is not stored in the files.
        warnings.warn(f"{where}: normalize_activations='expected_average_only_in' is not applied at inference by "
                      "SAELens either; make sure the dataset scale was folded into these weights", stacklevel=3)
        normalization, eps = "none", 1e-6
    elif norm_kind == "layer_norm":
        # SAELens: (x - mean) / (std + 1e-5) in, x * std + mean out (ours undoes exactly, std + eps).
        normalization, eps = "per_token", 1e-5
    else:
        raise ValueError(f"{where}: normalize_activations={norm_kind!r} is not supported "
                         "(supported: none, expected_average_only_in, layer_norm)")

    ours = raw.get("llama3_sae") or {}
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    site = ours.get("site") or _site_of_hook(hook, where)
    cfg = SAEConfig(d_model=int(d_in), n_latents=int(d_sae), architecture=activation, k=k,
                    apply_b_pre_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                    decoder_unit_norm=_is_unit_norm(W_dec), normalization=normalization, norm_eps=eps,
                    site=site, model_name=meta.get("model_name") or raw.get("model_name"),
                    dtype=_dtype_name(W_enc, where),
                    source={"format": "sae_lens", "path": str(path), "architecture": arch, "hook_name": hook})
    return _build(cfg, W_enc=W_enc_rows, b_enc=b_enc, W_dec=W_dec, b_pre=b_dec,
                  threshold=tensors.get("threshold"), where=where)


# --------------------------------------------------------------------------- Llama Scope / lm-saes
def _load_llama_scope(path: Path) -> SparseAutoencoder:
    where = str(path / LLAMA_SCOPE_CFG)
    hp = _read_json(path / LLAMA_SCOPE_CFG)
    tensors = read_safetensors(path / LLAMA_SCOPE_WEIGHTS)
    _need(tensors, ("encoder.weight", "encoder.bias", "decoder.weight"), where)
    enc_w, enc_b, dec_w = tensors["encoder.weight"], tensors["encoder.bias"], tensors["decoder.weight"]
    d_sae, d_model = enc_w.shape
    if hp.get("d_model", d_model) != d_model or hp.get("d_sae", d_sae) != d_sae:
        raise ValueError(f"{where}: d_model={hp.get('d_model')} d_sae={hp.get('d_sae')} disagree with "
                         f"encoder.weight {tuple(enc_w.shape)}")
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if hook_in != hook_out:
        raise ValueError(f"{where}: hook_point_in={hook_in!r} != hook_point_out={hook_out!r} is a transcoder; "
                         "only SAEs are supported")
    use_bias = hp.get("use_decoder_bias", True)
    b_dec = tensors.get("decoder.bias") if use_bias else torch.zeros(d_model, dtype=dec_w.dtype)
    if b_dec is None:
        raise ValueError(f"{where}: use_decoder_bias is set but checkpoints/final.safetensors has no decoder.bias")

    act = str(hp.get("act_fn", "jumprelu")).lower()
    threshold = None
    if act == "jumprelu":
        if "log_jumprelu_threshold" in tensors:
            threshold = tensors["log_jumprelu_threshold"].float().exp()
        elif "jump_relu_threshold" in hp:
            threshold = torch.tensor(float(hp["jump_relu_threshold"]))
        else:
            raise ValueError(f"{where}: a jumprelu SAE needs jump_relu_threshold (or log_jumprelu_threshold weights)")
        activation, k = "jumprelu", None
    elif act == "topk":
        activation, k = "topk", int(hp["top_k"])
    elif act == "relu":
        activation, k = "relu", None
    else:
        raise ValueError(f"{where}: act_fn={act!r} is not supported (jumprelu, topk, relu)")

    norm_mode = hp.get("norm_activation", "dataset-wise")
    norm = None
    if norm_mode == "dataset-wise":
        avg = hp.get("dataset_average_activation_norm") or {}
        if not {"in", "out"} <= set(avg):
            raise ValueError(f"{where}: norm_activation='dataset-wise' needs dataset_average_activation_norm "
                             "with 'in' and 'out'")
        root = math.sqrt(d_model)
        norm = {"norm_shift": torch.zeros(d_model), "norm_in_scale": torch.tensor(root / float(avg["in"])),
                "norm_out_scale": torch.tensor(root / float(avg["out"]))}
        normalization = "dataset"
    elif norm_mode == "inference":
        normalization = "none"  # the scales were already folded into the weights
    else:
        raise ValueError(f"{where}: norm_activation={norm_mode!r} is not supported (dataset-wise, inference)")

    cfg = SAEConfig(d_model=int(d_model), n_latents=int(d_sae), architecture=activation, k=k,
                    rank_by_decoder_norm=activation == "topk" and bool(hp.get("sparsity_include_decoder_norm", False)),
                    apply_b_pre_to_input=bool(use_bias and hp.get("apply_decoder_bias_to_pre_encoder", False)),
                    decoder_unit_norm=_is_unit_norm(dec_w.t()), normalization=normalization,
                    site=_site_of_hook(hook_in, where), model_name=hp.get("model_name"),
                    dtype=_dtype_name(enc_w, where),
                    source={"format": "llama_scope", "path": str(path), "hook_point": hook_in})
    return _build(cfg, W_enc=enc_w, b_enc=enc_b, W_dec=dec_w.t(), b_pre=b_dec, threshold=threshold,
                  where=where, norm=norm)


# --------------------------------------------------------------------------- sparsify
def _load_sparsify(path: Path) -> SparseAutoencoder:
    where = str(path / SPARSIFY_CFG)
    raw = _read_json(path / SPARSIFY_CFG)
    for flag, what in (("transcode", "transcoders"), ("skip_connection", "skip connections")):
        if raw.get(flag):
            raise ValueError(f"{where}: {flag}=true; {what} are not supported")
    if raw.get("activation", "topk") != "topk":
        raise ValueError(f"{where}: activation={raw.get('activation')!r}; only topk sparsify SAEs are supported")
    tensors = read_safetensors(path / SPARSIFY_WEIGHTS)
    _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    enc_w = tensors["encoder.weight"]
    n_latents, d_in = enc_w.shape
    expected = raw.get("num_latents") or d_in * raw.get("expansion_factor", n_latents // d_in)
    if raw.get("d_in", d_in) != d_in or expected != n_latents:
        raise ValueError(f"{where}: d_in={raw.get('d_in')} num_latents={expected} disagree with encoder.weight "
                         f"{tuple(enc_w.shape)}")
    # sparsify saves each hookpoint in a directory named after it (e.g. layers.10, layers.10.mlp).
    site = None
    if _HF_RE.match(path.name) or _TL_RE.match(path.name):
        site = _site_of_hook(path.name, where)
    cfg = SAEConfig(d_model=int(d_in), n_latents=int(n_latents), architecture="topk", k=int(raw["k"]),
                    apply_b_pre_to_input=True, decoder_unit_norm=_is_unit_norm(tensors["W_dec"]),
                    site=site, model_name=raw.get("model"), dtype=_dtype_name(enc_w, where),
                    source={"format": "sparsify", "path": str(path), "hookpoint": path.name})
    return _build(cfg, W_enc=enc_w, b_enc=tensors["encoder.bias"], W_dec=tensors["W_dec"], b_pre=tensors["b_dec"],
                  where=where)


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
    cfg = SAEConfig(d_model=int(d_in), n_latents=int(d_hidden), architecture="relu", k=None,
                    apply_b_pre_to_input=False, decoder_unit_norm=_is_unit_norm(dec_w.t()),
                    dtype=_dtype_name(enc_w, where), source={"format": "goodfire", "path": where})
    return _build(cfg, W_enc=enc_w, b_enc=state["encoder_linear.bias"], W_dec=dec_w.t(),
                  b_pre=state["decoder_linear.bias"], where=where)


# --------------------------------------------------------------------------- export to SAELens
def export_sae_lens(sae: SparseAutoencoder, path: str | Path, *, hook_name: str | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` in SAELens 6's layout, so SAELens (and tools that
    read it, such as Neuronpedia uploads) compute the same function.

    A "dataset" normalisation and decoder-norm ranking are folded into the weights; "per_token"
    becomes SAELens's ``layer_norm``. BatchTopK exports as jumprelu with its learned thresholds.
    """
    from safetensors.torch import save_file

    from .io import _atomic_write

    cfg = sae.cfg
    if hook_name is None:
        if cfg.site is None:
            raise ValueError("this SAE has no site; pass hook_name=... (e.g. 'blocks.15.hook_resid_post')")
        try:
            hook_name = site_to_hook_name(cfg.site)
        except ValueError as e:
            raise ValueError(f"{e}; pass hook_name=... explicitly to export anyway") from None
    arch = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[cfg.architecture]

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
        if arch == "jumprelu":
            tensors["threshold"] = sae.threshold.to(dt).contiguous()

    normalize = {"none": "none", "dataset": "none", "per_token": "layer_norm"}[cfg.normalization]
    if cfg.normalization == "per_token" and cfg.norm_eps != 1e-5:
        warnings.warn(f"SAELens's layer_norm uses eps=1e-5; this SAE was trained with norm_eps={cfg.norm_eps}, so "
                      "SAELens's outputs will differ slightly", stacklevel=2)
    layer = int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else None
    out_cfg: dict[str, Any] = {
        "architecture": arch, "d_in": cfg.d_model, "d_sae": cfg.n_latents, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_pre_to_input, "normalize_activations": normalize,
        "reshape_activations": "none",
        "meta": {"model_name": cfg.model_name, "hook_name": hook_name, "hook_layer": layer, "hook_head_index": None,
                 "prepend_bos": None, "context_size": None, "dataset_path": None, "neuronpedia_id": None,
                 "sae_lens_version": "6.0.0", "sae_lens_training_version": "llama3-sae"},
        # Ignored by SAELens (it keeps only known fields); lets load_sae restore the exact site.
        "llama3_sae": {"site": cfg.site, "config": cfg.to_dict()},
    }
    if arch == "topk":
        out_cfg["k"] = cfg.k
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / SAE_LENS_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    text = json.dumps(out_cfg, indent=2) + "\n"
    _atomic_write(path / SAE_LENS_CFG, lambda tmp: Path(tmp).write_text(text))
    return path


__all__ = ["FORMATS", "detect_format", "export_sae_lens", "hook_name_to_site", "load_sae", "save_sae",
           "site_to_hook_name"]
