"""Device and dtype names as every command takes them (``--device auto|cpu|cuda|cuda:N``, ``--model-dtype
bf16|fp16|fp32``)."""

from __future__ import annotations

from typing import Literal

import torch

DTypeName = Literal["bf16", "fp16", "fp32"]
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The short names commands take."""
_ALIASES = {**DTYPES, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_of(name: str) -> torch.dtype:
    """``bf16`` / ``bfloat16`` / ... -> the torch dtype; anything else is a ValueError naming the choices."""
    if name not in _ALIASES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_ALIASES)}")
    return _ALIASES[name]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU; ``cuda`` without
    an index -> ``cuda:local_rank``. A CUDA device on a machine without one is a ValueError."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N or auto)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device
