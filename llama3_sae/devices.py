"""Device and dtype names as every command takes them (``--device auto|cpu|cuda|cuda:N``, ``--model-dtype
bf16|fp16|fp32``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Literal

import torch

DTypeName = Literal["bf16", "fp16", "fp32"]
ModelDTypeName = Literal["auto", "bf16", "fp16", "fp32"]
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


# --------------------------------------------------------------------------- the CPU
def cpu_info() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is no such file)."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    return cpu_info().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    return set(cpu_info().get("flags", "").split())


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features with bf16 arithmetic in hardware; without them torch emulates bf16 products (3-5x slower than
fp32 on the AVX2 EPYC in benchmarks/RESULTS.md)."""


def model_dtype(name: str, device: torch.device, fp32_bytes: int | None = None) -> torch.dtype:
    """``--model-dtype``: a named dtype, or ``auto``: bf16 on a GPU and on CPUs with native bf16; fp32 on other
    CPUs unless the fp32 weights (``fp32_bytes``) would take more than half the available memory."""
    if name != "auto":
        return dtype_of(name)
    if device.type != "cpu" or cpu_flags() & set(NATIVE_BF16_FLAGS):
        return torch.bfloat16
    if fp32_bytes is not None and fp32_bytes > 0.5 * _available_memory():
        return torch.bfloat16
    return torch.float32


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) if hasattr(os, "sysconf") else 1 << 40
