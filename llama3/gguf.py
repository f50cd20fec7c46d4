"""GGUF checkpoints (llama.cpp's single-file format), read with the ``gguf`` package.

A GGUF file holds the hyper-parameters (``llama.*`` keys), the tokenizer (``tokenizer.ggml.*`` keys and
``tokenizer.chat_template``) and the weights, most of them block-quantized. This module turns them into
what the rest of ``llama3`` uses: ``ModelArgs``, a state dict under Meta's names, and a ``TokenizerSpec``
that ``llama3.hf_tokenizer`` builds a tokenizer from.

Rotary layout: llama.cpp's converter permutes HF's q/k rows back into Meta's interleaved pairs (the same
permutation as ``checkpoint.unpermute_rotary``), because ggml's "normal" RoPE rotates adjacent pairs as
Meta's reference does. Our model uses Meta's layout, so the GGUF rows are used as stored; transformers,
whose model rotates halves, applies the inverse when it reads a GGUF (the tests compare the two).

Weights are dequantized with the gguf package's own dequantizer, tensor by tensor and in row chunks, into
tensors of the caller's dtype, so loading never holds more than the final weights and one chunk. The
dequantized state dict can be cached as safetensors keyed by the file's sha256 (``load_gguf``), so a
second start reads no GGUF at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama3_sae.files import HashIndex
from llama3_sae.tensorfile import save_safetensors

from .args import ModelArgs
from .model import Transformer, rope_frequencies

ARCHITECTURE = "llama"

# GGUF name -> Meta name, "{}" standing for the layer index.
GGUF_TO_META: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1-style scaling: per-frequency divisors (1 .. factor)

# Tensor types read here: stored floats, and every block quantization the gguf package dequantizes.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
               "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
               "TQ1_0", "TQ2_0", "MXFP4")
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES
# What one dequantized chunk may take (fp32), so a 128k-row embedding never makes a full fp32 copy.
_CHUNK_BYTES = 8 << 20
# Bump when what the cache holds changes meaning.
CACHE_VERSION = 1

_LAYER = re.compile(r"\.(\d+)\.")


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf checkpoints needs the gguf package (llama.cpp's reader): "
                          "pip install gguf  (or pip install 'llama3-sae[gguf]')") from None
    return gguf


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the one ``*.gguf`` in a directory; None if neither.

    A directory with several raises ValueError naming them (which one is meant cannot be guessed)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(files) > 1:
            raise ValueError(f"{path} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}); pass the "
                             "one to load as --ckpt-dir PATH/FILE.gguf")
        return files[0] if files else None
    return None


@dataclass
class TokenizerSpec:
    """What a GGUF file says about its tokenizer (``tokenizer.ggml.*``), in llama.cpp's terms."""

    model: str
    """``tokenizer.ggml.model``: "gpt2" (byte-level BPE) is the one read here."""
    pre: str | None
    """``tokenizer.ggml.pre``: the pre-tokenizer (e.g. "llama-bpe", "smollm")."""
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    """1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte (llama.cpp's llama_token_type)."""
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "TokenizerSpec":
        return cls(**raw)


class GGUFFile:
    """An opened GGUF file (memory-mapped by gguf's reader; tensors are read on demand)."""

    def __init__(self, path: str | Path) -> None:
        gguf = _require_gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # a truncated download or not a GGUF at all: say which file and why
            raise ValueError(f"cannot read {self.path} as GGUF ({type(e).__name__}: {e}). The file is truncated or "
                             "not a GGUF file: download it again") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.get("general.architecture")
        if arch != ARCHITECTURE:
            raise ValueError(f"{self.path}: architecture {arch!r} is not supported; this model implementation reads "
                             f"GGUF files of architecture {ARCHITECTURE!r} (Llama 2/3 and models built like them, "
                             "e.g. SmolLM2)")
        self._check_sizes()

    def _check_sizes(self) -> None:
        # gguf's memmap slices silently come out short when the file is cut; compare with the declared sizes.
        gguf = _require_gguf()
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            want = int(np.prod([int(d) for d in t.shape])) // block * type_size
            if t.data_offset + want > size or t.data.nbytes != want:
                raise ValueError(f"{self.path} is truncated: tensor {t.name} needs {want} bytes at offset "
                                 f"{t.data_offset} but the file has {size} bytes; download it again")

    def drop_metadata(self) -> None:
        """Free the parsed metadata (the tokenizer's ~100k strings are ~100k small objects in gguf's reader)
        once ``model_args`` and ``tokenizer_spec`` have been read, before the weights are."""
        import gc

        self.reader.fields = {}
        gc.collect()

    def get(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: the GGUF metadata has no {key!r}, which a {ARCHITECTURE} model needs")
        return value

    # ------------------------------------------------------------------ hyper-parameters
    def model_args(self, **overrides: Any) -> ModelArgs:
        """``ModelArgs`` from the ``llama.*`` keys; rope scaling from ``rope_freqs.weight`` when present."""
        a = ARCHITECTURE
        kwargs: dict[str, Any] = {
            "dim": int(self.require(f"{a}.embedding_length")),
            "n_layers": int(self.require(f"{a}.block_count")),
            "n_heads": self.require(f"{a}.attention.head_count"),
            "n_kv_heads": self.get(f"{a}.attention.head_count_kv"),
            "ffn_hidden_dim": int(self.require(f"{a}.feed_forward_length")),
            "norm_eps": float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self.get(f"{a}.rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
        }
        for key in ("n_heads", "n_kv_heads"):
            if isinstance(kwargs[key], list):
                raise ValueError(f"{self.path}: per-layer head counts ({key}) are not supported")
        kwargs["n_heads"] = int(kwargs["n_heads"])
        kwargs["n_kv_heads"] = int(kwargs["n_kv_heads"]) if kwargs["n_kv_heads"] is not None else None
        vocab = self.get(f"{a}.vocab_size")
        if vocab is None:
            emb = self.tensors.get("token_embd.weight")
            vocab = int(emb.shape[1]) if emb is not None else len(self.require("tokenizer.ggml.tokens"))
        kwargs["vocab_size"] = int(vocab)
        head_dim = kwargs["dim"] // kwargs["n_heads"]
        for key in (f"{a}.rope.dimension_count", f"{a}.attention.key_length", f"{a}.attention.value_length"):
            value = self.get(key)
            if value is not None and int(value) != head_dim:
                raise ValueError(f"{self.path}: {key}={value} differs from embedding_length / head_count = {head_dim}; "
                                 "partial rotary and custom head sizes are not supported")
        kwargs.update(self._rope_scaling(ModelArgs(**kwargs)))
        kwargs.update(overrides)
        return ModelArgs(**kwargs)

    def _rope_scaling(self, base: ModelArgs) -> dict[str, Any]:
        a = ARCHITECTURE
        kind = self.get(f"{a}.rope.scaling.type")
        factor = self.get(f"{a}.rope.scaling.factor")
        if kind not in (None, "none") and ROPE_FREQS not in self.tensors:
            if kind == "linear" and factor in (None, 1.0):
                return {"use_scaled_rope": False}
            raise ValueError(f"{self.path}: rope scaling type {kind!r} (factor {factor}) is not supported; only "
                             "Llama 3.1-style scaling (a rope_freqs.weight tensor) is")
        if ROPE_FREQS not in self.tensors:
            return {"use_scaled_rope": False}
        divisors = torch.from_numpy(np.array(self.tensors[ROPE_FREQS].data, dtype=np.float32)).flatten()
        if divisors.numel() != base.head_dim // 2:
            raise ValueError(f"{self.path}: {ROPE_FREQS} has {divisors.numel()} entries, expected head_dim / 2 = "
                             f"{base.head_dim // 2}")
        if torch.all(divisors == 1):
            return {"use_scaled_rope": False}

        orig = self.get(f"{a}.rope.scaling.original_context_length")
        scaling = {"use_scaled_rope": True, "rope_scaling_factor": float(divisors.max()),
                   "rope_original_max_pos": int(orig) if orig else base.rope_original_max_pos}
        # The divisors say the factor outright; the band edges (low/high freq factors) are not stored, so
        # take Llama 3.1's (1, 4) and check that they reproduce every divisor.
        unscaled = rope_frequencies(dataclasses.replace(base, use_scaled_rope=False))
        scaled = rope_frequencies(dataclasses.replace(base, **scaling))
        got = unscaled / scaled
        if not torch.allclose(got, divisors, rtol=1e-4, atol=0):
            worst = float((got / divisors - 1).abs().max())
            raise ValueError(f"{self.path}: {ROPE_FREQS} is not Llama 3.1-style scaling with factor "
                             f"{scaling['rope_scaling_factor']:g} and frequency band (1, 4) over "
                             f"{scaling['rope_original_max_pos']} positions (relative difference {worst:.2e})")
        return scaling

    # ------------------------------------------------------------------ tokenizer
    def tokenizer_spec(self) -> TokenizerSpec:
        model = self.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError(f"{self.path} holds no tokenizer (no tokenizer.ggml.model key); pass one with --tokenizer")
        pre = self.get("tokenizer.ggml.pre")

        def opt_int(key: str) -> int | None:
            value = self.get(key)
            return None if value is None else int(value)

        add_bos = self.get("tokenizer.ggml.add_bos_token")
        return TokenizerSpec(
            model=str(model), pre=None if pre is None else str(pre),
            tokens=list(self.require("tokenizer.ggml.tokens")),
            merges=list(self.get("tokenizer.ggml.merges") or []),
            token_types=[int(t) for t in (self.get("tokenizer.ggml.token_type") or [])],
            bos_id=opt_int("tokenizer.ggml.bos_token_id"), eos_id=opt_int("tokenizer.ggml.eos_token_id"),
            eot_id=opt_int("tokenizer.ggml.eot_token_id"), eom_id=opt_int("tokenizer.ggml.eom_token_id"),
            unk_id=opt_int("tokenizer.ggml.unknown_token_id"), pad_id=opt_int("tokenizer.ggml.padding_token_id"),
            # llama.cpp adds BOS for Llama 3's pre-tokenizer when the file does not say; other BPE models do not.
            add_bos=bool(add_bos) if add_bos is not None else pre in ("llama-bpe", "llama3"),
            add_eos=bool(self.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=self.get("tokenizer.chat_template"),
        )

    # ------------------------------------------------------------------ tensors
    def tensor_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in torch order (ggml lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor ``name`` dequantized into a new tensor of ``dtype`` on ``device``, a chunk of rows at a time."""
        from gguf import quants

        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ValueError(f"{self.path}: tensor {name} is stored as {kind}, which is not supported; supported types: "
                             f"{', '.join(SUPPORTED_TYPES)} (refused: every other ggml type, e.g. Q8_1, Q8_K, Q1_0)")
        shape = self.shape(name)
        out = torch.empty(shape, dtype=dtype, device=device)
        data = t.data
        rows = shape[0] if len(shape) > 1 else 1
        flat_out = out.view(rows, -1)
        data = data.reshape(rows, -1)
        row_bytes = 4 * (out.numel() // max(rows, 1))
        step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
        for r0 in range(0, rows, step):
            part = data[r0:r0 + step]
            if kind in ("F32", "F16", "F64"):
                chunk = torch.from_numpy(np.array(part))
            elif kind == "BF16":
                chunk = torch.from_numpy(np.array(part).view(np.int16)).view(torch.bfloat16)
            else:
                chunk = torch.from_numpy(quants.dequantize(part, t.tensor_type))
            flat_out[r0:r0 + step].copy_(chunk.reshape(flat_out[r0:r0 + step].shape))
        self._release_pages(t)
        return out

    def _release_pages(self, t) -> None:
        # The file's pages stay mapped (and counted in RSS) after reading; drop those of a tensor once it is
        # dequantized, so loading peaks near the size of the weights rather than weights + file.
        import mmap

        mm = getattr(self.reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
        except (OSError, ValueError, AttributeError):
            pass


def _meta_name(name: str) -> str | None:
    m = _LAYER.search(name)
    template, layer = (name, None) if m is None else (name[: m.start()] + ".{}." + name[m.end():], m.group(1))
    meta = GGUF_TO_META.get(template)
    return None if meta is None else meta.format(layer)


def read_state_dict(f: GGUFFile, params: ModelArgs, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All weights under Meta names, checked against ``params`` (every problem reported at once)."""

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(params).state_dict().items()}
    if params.tie_word_embeddings:
        expected.pop("output.weight", None)
    names = {name: _meta_name(name) for name in f.tensors if name != ROPE_FREQS}
    problems = []
    unexpected = sorted(n for n, m in names.items() if m is None or m not in expected)
    missing = sorted(set(expected) - {m for m in names.values() if m is not None})
    if missing:
        problems.append(f"missing tensors (Meta names): {', '.join(missing[:12])}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:12])}")
    for name, meta in names.items():
        if meta in expected and f.shape(name) != expected[meta]:
            problems.append(f"shape mismatch for {name}: the file has {f.shape(name)}, its metadata implies "
                            f"{expected[meta]}")
    if problems:
        raise ValueError(f"{f.path} does not match its own metadata:\n  - " + "\n  - ".join(problems))
    sd = {meta: f.read(name, dtype, device) for name, meta in names.items() if meta is not None}
    if params.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


# --------------------------------------------------------------------------- the cache
def file_sha256(path: Path, cache_dir: Path) -> str:
    """The GGUF file's sha256, hashed once per version of the file (``cache_dir/hashes.json``)."""
    index = HashIndex(Path(cache_dir) / "hashes.json")
    digest = index.sha256(path)
    index.save()
    return digest


def cached_meta(path: Path, cache_dir: Path | None) -> dict[str, Any] | None:
    """What the cache recorded about ``path`` (params, tokenizer) for any dtype, or None. Opening a GGUF parses
    its whole vocabulary (seconds); this reads one small JSON file."""
    if cache_dir is None or not Path(cache_dir).is_dir():
        return None
    sha = file_sha256(path, cache_dir)
    for meta in sorted(Path(cache_dir).glob(f"{sha[:24]}-*/meta.json")):
        try:
            raw = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if raw.get("sha256") == sha and raw.get("version") == CACHE_VERSION:
            return raw
    return None


@dataclass
class GGUFCheckpoint:
    """A GGUF file's weights (Meta names), hyper-parameters and tokenizer description."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    params: ModelArgs
    tokenizer: TokenizerSpec | None
    """None when the file holds no tokenizer."""
    sha256: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              cache_dir: Path | None = None, **overrides: Any) -> GGUFCheckpoint:
    """Read a GGUF file, or its dequantized copy from ``cache_dir`` (keyed by sha256 and dtype).

    With ``cache_dir`` None nothing is cached. ``overrides`` go to ``ModelArgs`` (max_seq_len, ...)."""
    path = Path(path)
    sha = None
    if cache_dir is not None:
        sha = file_sha256(path, cache_dir)
        entry = Path(cache_dir) / f"{sha[:24]}-{_dtype_name(dtype)}-v{CACHE_VERSION}"
        if (entry / "meta.json").is_file():
            try:
                return _read_cache(path, entry, sha, device, overrides)
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                pass
    f = GGUFFile(path)
    params = f.model_args(**overrides)
    spec = f.tokenizer_spec() if f.get("tokenizer.ggml.model") is not None else None  # weights-only files load too
    f.drop_metadata()
    sd = read_state_dict(f, params, dtype=dtype, device=device)
    info = {"types": sorted({f.tensor_type(n) for n in f.tensors})}
    del f
    ckpt = GGUFCheckpoint(path, sd, params, spec, sha256=sha, info=info)
    if cache_dir is not None:
        try:
            _write_cache(ckpt, entry)
        except OSError:
            pass  # a full or read-only cache only costs the next start its dequantization
    return ckpt


def _runtime_free(params: ModelArgs) -> dict[str, Any]:
    raw = dataclasses.asdict(params)
    raw.pop("max_seq_len"), raw.pop("max_batch_size")
    return raw


def _write_cache(ckpt: GGUFCheckpoint, entry: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        tensors = {k: v for k, v in ckpt.state_dict.items()
                   if not (ckpt.params.tie_word_embeddings and k == "output.weight")}
        save_safetensors(tensors, tmp / "weights.safetensors")
        meta = {"source": str(ckpt.path), "sha256": ckpt.sha256, "version": CACHE_VERSION,
                "params": _runtime_free(ckpt.params), "tokenizer": ckpt.tokenizer.to_json() if ckpt.tokenizer else None, "info": ckpt.info}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(path: Path, entry: Path, sha: str, device, overrides: dict[str, Any]) -> GGUFCheckpoint:
    from safetensors.torch import load_file

    meta = json.loads((entry / "meta.json").read_text())
    if meta.get("sha256") != sha or meta.get("version") != CACHE_VERSION:
        raise ValueError("stale cache entry")
    params = ModelArgs(**{**meta["params"], **overrides})
    sd = load_file(str(entry / "weights.safetensors"), device=str(device))
    if params.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    spec = TokenizerSpec.from_json(meta["tokenizer"]) if meta.get("tokenizer") else None
    return GGUFCheckpoint(path, sd, params, spec, sha256=sha, info=meta.get("info", {}))
