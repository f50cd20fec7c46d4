"""Full-state training checkpoints: atomic directories, newest-first resume, keep-last-N.

A checkpoint is ``OUT/checkpoints/step-NNNNNNNNN/`` holding ``state.safetensors`` (weights, optimizer
moments, dead-latent counters, EMA weights, RNG states) and ``state.json`` (step, data position,
scheduler, optimizer hyper-parameters, the run's config). It is written under a temporary name, each
file flushed to disk, and renamed into place in one step: a process killed at any moment leaves either
a complete checkpoint or a temporary directory that the next save removes. Older checkpoints are
deleted only after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from llama3_sae.errors import naming
from llama3_sae.tensorfile import save_safetensors

from llama3_sae.files import fsync_dir
from safetensors import safe_open

CHECKPOINTS = "checkpoints"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
FORMAT = "llama3-sae-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d{9})$")


def checkpoint_root(out: Path) -> Path:
    return Path(out) / CHECKPOINTS


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(root: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"
    tmp.mkdir()
    try:
        with naming(final):
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_safetensors(cpu, tmp / STATE_TENSORS, {"format": FORMAT, "version": str(VERSION)}, fsync=False)
            (tmp / STATE_JSON).write_text(json.dumps({"format": FORMAT, "version": VERSION, "step": step, **meta},
                                                     indent=1) + "\n")
            for name in (STATE_TENSORS, STATE_JSON):
                _fsync_file(tmp / name)
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (a resumed run that ended exactly here)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint directory."""
    path = Path(path)
    try:
        meta = json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / STATE_JSON}: cannot read the checkpoint ({e}); delete {path} to resume from "
                         "an older checkpoint") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: not a version-{VERSION} {FORMAT} (format={meta.get('format')!r}, "
                         f"version={meta.get('version')!r})")
    with safe_open(str(path / STATE_TENSORS), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return tensors, meta


# --------------------------------------------------------------------------- optimizer state by name
def flatten_optimizer(state: dict[str, Any], names: list[str]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """``optimizer.state_dict()`` -> tensors keyed ``optim.<param name>.<key>`` and JSON-able param groups.

    Keyed by parameter name rather than position so that a checkpoint does not depend on how the
    optimizer was built (and a latent-sharded run stores the same names as an unsharded one)."""
    tensors: dict[str, torch.Tensor] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optim.{names[idx]}.{key}"] = value
    groups = []
    for g in state["param_groups"]:
        group = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        group["params"] = [names[i] for i in g["params"]]
        groups.append(group)
    return tensors, groups


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]],
                        names: list[str]) -> dict[str, Any]:
    """The inverse of ``flatten_optimizer`` for an optimizer whose parameters are ``names`` in order."""
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, sub = key[len("optim."):].rsplit(".", 1)
        if name not in index:
            raise ValueError(f"checkpoint has optimizer state for {name!r}, which this model does not have")
        state.setdefault(index[name], {})[sub] = value
    param_groups = []
    for g in groups:
        group = {k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k != "params"}
        group["params"] = [index[n] for n in g["params"]]
        param_groups.append(group)
    return {"state": state, "param_groups": param_groups}


# --------------------------------------------------------------------------- RNG
def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][: torch.cuda.device_count()])
