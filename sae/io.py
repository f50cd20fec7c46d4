"""This project's SAE directory: ``config.json`` + ``sae.safetensors`` (+ ``latents.jsonl`` labels).

Files are written to a temporary name and renamed, so an interrupted save never leaves half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from safetensors import safe_open

from llama3_sae.files import atomic_path, atomic_write_text
from llama3_sae.tensorfile import save_safetensors

from .config import FORMAT_NAME, FORMAT_VERSION, SAEConfig

if TYPE_CHECKING:  # the module works on any SAE's state dict; the class imports this module, not the reverse
    from .model import SparseAutoencoder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
LATENTS_FILE = "latents.jsonl"


def save_sae(sae: "SparseAutoencoder", path: str | Path) -> Path:
    """Write the SAE to directory ``path`` (created if needed). A ``latents.jsonl`` already there is kept."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; an SAE is saved as a directory")
    path.mkdir(parents=True, exist_ok=True)
    # Contiguous CPU copies: safetensors stores raw bytes, and buffers may live on a GPU.
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    with atomic_path(path / WEIGHTS_FILE) as tmp:  # atomic_path flushes it: no second fsync in the writer
        save_safetensors(tensors, tmp, metadata, fsync=False)
    atomic_write_text(path / CONFIG_FILE, json.dumps(sae.cfg.to_dict(), indent=2) + "\n")
    return path


def is_native_dir(path: Path) -> bool:
    cfg = path / CONFIG_FILE
    if not (cfg.is_file() and (path / WEIGHTS_FILE).is_file()):
        return False
    try:
        raw = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        # config.json + sae.safetensors is this project's layout: a damaged config must say so, not look foreign.
        raise ValueError(f"{cfg} is not valid JSON ({e}); the SAE's config is damaged: restore it or re-export "
                         "the SAE") from None
    return isinstance(raw, dict) and raw.get("format") == FORMAT_NAME


def read_native(path: str | Path) -> tuple[SAEConfig, dict[str, torch.Tensor], Path]:
    """The config and tensors of a directory written by ``save_sae`` (``SparseAutoencoder.load`` builds the
    module from them), and the weights file's path."""
    path = Path(path)
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: an SAE directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    cfg = SAEConfig.from_dict(raw, where=str(cfg_path))
    return cfg, read_safetensors(weights_path), weights_path


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def load_state(sae: "SparseAutoencoder", tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy tensors into the SAE, checking names, shapes and dtypes so a mismatch says what is wrong."""
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: tensors do not match the config (missing {missing}, unexpected {extra})")
    for name, t in tensors.items():
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, the config implies {tuple(want.shape)}")
        if t.dtype != want.dtype:
            raise ValueError(f"{where}: {name} is {t.dtype}, the config says {want.dtype}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


# --------------------------------------------------------------------------- latent labels
def read_latents(path: str | Path) -> dict[int, dict[str, Any]]:
    """``latents.jsonl`` of an SAE directory (or the file itself): {latent: record}. Missing file -> {}."""
    path = Path(path)
    if path.is_dir():
        path = path / LATENTS_FILE
    if not path.exists():
        return {}
    out: dict[int, dict[str, Any]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from e
        latent = record.get("latent") if isinstance(record, dict) else None
        if not isinstance(latent, int) or isinstance(latent, bool) or latent < 0:
            raise ValueError(f"{path}:{lineno}: each line needs a non-negative integer 'latent'")
        out[latent] = record
    return out


def write_latents(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``latents.jsonl`` (one JSON object per line, sorted by latent), replacing the file atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / LATENTS_FILE
    rows = sorted(records, key=lambda r: r["latent"])
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path

