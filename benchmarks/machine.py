"""What every benchmark prints and records about the machine it ran on: CPU model, cores, the SIMD and
matrix extensions present, the accelerator, torch version, threads and the load average at the start
(a busy machine's numbers are not comparable). ``RESULTS.md`` keeps one table per machine kind."""

from __future__ import annotations

import os
from typing import Any

import torch

from llama3_sae.devices import cpu_flags, cpu_info, cpu_name

EXTENSIONS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_family() -> str | None:
    """"family F model M": what tells apart two CPUs that a VM names alike ("AMD EPYC")."""
    info = cpu_info()
    return f"family {info['cpu family']} model {info['model']}" if "cpu family" in info and "model" in info else None


def cpu_extensions() -> list[str]:
    present = cpu_flags()
    return [e for e in EXTENSIONS if e in present]


def describe() -> dict[str, Any]:
    """The machine, as a JSON-able dict (goes into each benchmark's results)."""
    return {"cpu": cpu_name(), "cpu_family": cpu_family(), "cores": os.cpu_count(), "extensions": cpu_extensions(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def banner(info: dict[str, Any] | None = None) -> str:
    """One line for the top of a benchmark's output."""
    m = info or describe()
    ext = ", ".join(m["extensions"]) or "no AVX2/AVX-512/AMX"
    gpu = f"; GPU {m['gpu']}" if m["gpu"] else ""
    busy = " (busy: numbers are not comparable)" if m["load_avg"] and m["load_avg"] > 0.5 * (m["cores"] or 1) else ""
    family = f" ({m['cpu_family']})" if m.get("cpu_family") else ""
    return (f"machine: {m['cpu']}{family}, {m['cores']} cores ({ext}){gpu}; torch {m['torch']}, {m['threads']} threads; "
            f"load average {m['load_avg']}{busy}")
