"""Writing safetensors files byte-for-byte reproducibly, one tensor at a time.

safetensors' own ``save_file`` puts the metadata through a Rust hash map, so the same tensors written by
two processes can differ in header order (and sha256); it also copies every tensor into one bytes object
first. This writer emits the header in a fixed order (tensors as given, metadata keys sorted) and streams
each tensor's bytes, so identical inputs give identical files and memory stays at one tensor. The files
are ordinary safetensors: ``safetensors.torch.load_file`` and ``safe_open`` read them.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

from .errors import naming

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None, *, fsync: bool = True) -> None:
    """Write ``tensors`` to ``path`` (not atomically: write to a temporary name and rename for that)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with naming(path), open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for t in tensors.values():
            if t.numel():
                fh.write(memoryview(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()))
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


HEADER_ERRORS = (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError)
"""What ``read_header`` raises on a missing, short or damaged file."""


def read_header(path: str | Path) -> tuple[int, dict]:
    """(header length in bytes, the JSON header) of a safetensors file, without reading its data; the data
    of tensor t is at ``8 + length + header[t]["data_offsets"]``."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return header_len, json.loads(f.read(header_len))
