"""Model hyper-parameters: read from Meta's ``params.json`` or HF's ``config.json``, or named presets."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Llama 3.2 1B/3B were trained with RoPE scaling factor 32, Llama 3.1 with 8; Meta's params.json does
# not say which, so shapes we know pick it when nothing else does. Keyed by (dim, n_layers).
_ROPE_FACTOR_BY_SHAPE: dict[tuple[int, int], float] = {
    (2048, 16): 32.0,  # Llama 3.2 1B
    (3072, 28): 32.0,  # Llama 3.2 3B
    (4096, 32): 8.0,  # Llama 3.1 8B
    (8192, 80): 8.0,  # Llama 3.1 70B
    (16384, 126): 8.0,  # Llama 3.1 405B
}
_DEFAULT_ROPE_FACTOR = 8.0


@dataclass
class ModelArgs:
    """Shape and numerics of a Llama 3 text model. Names follow Meta's ``params.json``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None
    """Explicit SwiGLU width (HF ``intermediate_size``); derived from dim/multiple_of/multiplier when None."""
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = True
    rope_scaling_factor: float | None = None
    """None means: pick by known model shape (32 for Llama 3.2 1B/3B, 8 otherwise)."""
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    tie_word_embeddings: bool = False
    """Llama 3.2 1B/3B reuse the embedding matrix as the output head."""
    max_batch_size: int = 32
    max_seq_len: int = 2048

    @property
    def n_params(self) -> int:
        """Parameters of a model of this shape (the tied head counted once)."""
        hd, kv = self.head_dim, self.n_kv_heads or self.n_heads
        block = 2 * self.dim * self.n_heads * hd + 2 * self.dim * kv * hd + 3 * self.dim * self.hidden_dim + 2 * self.dim
        embeddings = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * block + embeddings + self.dim

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_batch_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if problems:
            raise ValueError("invalid ModelArgs: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width, computed the way Meta's reference does unless given explicitly."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def resolved_rope_scaling_factor(self) -> float:
        if self.rope_scaling_factor is not None:
            return float(self.rope_scaling_factor)
        return _ROPE_FACTOR_BY_SHAPE.get((self.dim, self.n_layers), _DEFAULT_ROPE_FACTOR)

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_params_json(cls, path: str | Path, **overrides: Any) -> "ModelArgs":
        """Read Meta's ``params.json``. Unknown keys are warned about, never silently dropped."""
        path = Path(path)
        raw = _read_json(path)
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in raw and k not in overrides]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)}: a params.json must give the model's shape "
                             "(dim, n_layers, n_heads; n_kv_heads and vocab_size when they differ from n_heads "
                             "and 128256)")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        unknown = sorted(set(raw) - known)
        if unknown:
            warnings.warn(f"{path}: ignoring keys this model does not use: {unknown}", stacklevel=2)
        # Llama 3.0 checkpoints have no use_scaled_rope key and were trained without scaling.
        kwargs.setdefault("use_scaled_rope", False)
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf_config(cls, path: str | Path, **overrides: Any) -> "ModelArgs":
        """Read a transformers ``config.json`` of a ``LlamaForCausalLM``."""
        path = Path(path)
        raw = _read_json(path)
        if raw.get("model_type", "llama") != "llama":
            raise ValueError(f"{path}: model_type={raw.get('model_type')!r}; only 'llama' checkpoints are supported")
        for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if key in raw and raw[key] != want:
                raise ValueError(f"{path}: {key}={raw[key]!r} is not supported (Llama 3 uses {want!r})")
        kwargs: dict[str, Any] = {}
        for hf_key, our_key in _HF_KEYS.items():
            if hf_key in raw and raw[hf_key] is not None:
                kwargs[our_key] = raw[hf_key]
        n_heads = kwargs.get("n_heads", cls.n_heads)
        if raw.get("head_dim") not in (None, kwargs.get("dim", cls.dim) // n_heads):
            raise ValueError(f"{path}: head_dim={raw['head_dim']} differs from hidden_size/num_attention_heads; unsupported")
        # transformers >= 5 writes "rope_parameters" (with rope_theta inside) instead of "rope_scaling".
        rope = raw.get("rope_scaling") or raw.get("rope_parameters")
        if rope and "rope_theta" not in kwargs and rope.get("rope_theta") is not None:
            kwargs["rope_theta"] = rope["rope_theta"]
        if rope is None or rope.get("rope_type", rope.get("type")) == "default":
            kwargs["use_scaled_rope"] = False
        else:
            rope_type = rope.get("rope_type", rope.get("type"))
            if rope_type != "llama3":
                raise ValueError(f"{path}: rope_scaling type {rope_type!r} is not supported; expected 'llama3'")
            kwargs.update(
                use_scaled_rope=True,
                rope_scaling_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                rope_original_max_pos=int(rope.get("original_max_position_embeddings", 8192)),
            )
        unknown = sorted(set(raw) - set(_HF_KEYS) - _HF_IGNORED)
        if unknown:
            warnings.warn(f"{path}: ignoring keys this model does not use: {unknown}", stacklevel=2)
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


_HF_KEYS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "vocab_size": "vocab_size",
    "intermediate_size": "ffn_hidden_dim",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_word_embeddings",
}
# Keys that carry no information the forward pass needs (or are checked above).
_HF_IGNORED = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
    "attention_bias", "mlp_bias", "attention_dropout", "initializer_range", "pretraining_tp", "use_cache",
    "torch_dtype", "dtype", "transformers_version", "head_dim", "rope_scaling", "max_position_embeddings",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "rope_parameters",
}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


PRESETS: dict[str, ModelArgs] = {
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
                             multiple_of=256, rope_scaling_factor=32.0, tie_word_embeddings=True),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0,
                             multiple_of=256, rope_scaling_factor=32.0, tie_word_embeddings=True),
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                             multiple_of=1024, rope_scaling_factor=8.0),
    "llama3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                              multiple_of=4096, rope_scaling_factor=8.0),
    # The built-in demo model: Llama 3 architecture and the real 128,256-token vocabulary, tiny widths.
    "tiny": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, rope_scaling_factor=32.0,
                      tie_word_embeddings=True, max_seq_len=512, max_batch_size=8),
}
