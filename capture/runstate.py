"""A capture's state in OUT, between its first start and its finished stores: what OUT allows (start,
resume, finalise, already complete, or refuse and why), and the finalisation that turns the ranks' parts
into stores. On disk while running (``OUT`` = ``cfg.out``)::

    OUT/.capture/run.json                   what is being captured (a resumed run must match it)
    OUT/.capture/progress-r{R}of{W}.json    rank R's commit point (``capture.records.Progress``)
    OUT/<site>/.parts/r{R}of{W}/shard-*.safetensors

When every rank is finished, rank 0 renames the parts into ``OUT/<site>/shard-NNNNNN.safetensors``
(following a plan written first, so a kill during this step is finished by the next run), writes each
``manifest.json`` and removes the run state.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

from llama3.checkpoint import checkpoint_name
from llama3_sae.config import identity_differences
from llama3_sae.files import atomic_write_json

from .config import DTYPES, CaptureConfig
from .records import MANIFEST, Manifest, Progress, ShardEntry
from .sources import resolve_files
from .store import DTYPE_NAMES, shard_name

STATE_DIR = ".capture"
PARTS_DIR = ".parts"


def state_dir(cfg: CaptureConfig) -> Path:
    return cfg.out / STATE_DIR


def progress_path(cfg: CaptureConfig, rank: int, world: int) -> Path:
    return state_dir(cfg) / f"progress-r{rank}of{world}.json"


def part_dir(cfg: CaptureConfig, site: str, rank: int, world: int) -> Path:
    return cfg.out / site / PARTS_DIR / f"r{rank}of{world}"


# --------------------------------------------------------------------------- run state
def decide(cfg: CaptureConfig, sites: list[str], world: int) -> tuple[str, str]:
    """Rank 0 looks at OUT: ("capture"|"finalize"|"complete", "") or ("error", message)."""
    ident = cfg.identity()
    state = state_dir(cfg)
    run_path = state / "run.json"
    if run_path.is_file():
        run = json.loads(run_path.read_text())
        diff = identity_differences(run["identity"], ident)
        if (diff or run["world"] != world) and not _has_progress(state):
            # An attempt that failed before committing anything: nothing to keep, start afresh.
            for p in state.glob("progress-r*of*.json"):
                p.unlink()
            diff = ""
            run = _start_run(run_path, cfg, world)
        if diff:
            return "error", (f"{cfg.out} holds an unfinished capture with other options ({diff}). Re-run it with "
                             f"the same options to finish it, or delete {state} and {[str(cfg.out / s) for s in sites]}"
                             " to start over, or pick another --out.")
        if "model_fingerprint" in run and _model_fingerprint(cfg) != run["model_fingerprint"] and _has_progress(state):
            return "error", (f"the checkpoint {cfg.ckpt_dir} changed since the unfinished capture in {cfg.out} started "
                             "(its files' sizes or modification times differ); resuming would mix two models' "
                             f"activations. Restore it, or delete {state} and {[str(cfg.out / s) for s in sites]} to "
                             "start over.")
        if _fingerprint(cfg) != run.get("data_fingerprint"):
            return "error", (f"the files under --data changed since the unfinished capture in {cfg.out} started "
                             f"(size or modification time); resuming would mix two datasets. Restore them, or "
                             f"delete {state} and {[str(cfg.out / s) for s in sites]} to start over.")
        if run["world"] != world:
            return "error", (f"{cfg.out} holds an unfinished capture run with {run['world']} rank(s); resume it with "
                             f"the same number of ranks (torchrun --nproc-per-node {run['world']}), or delete {state} "
                             "and the site directories to start over.")
        if (state / "finalize.json").is_file():
            return "finalize", ""
        return "capture", ""
    complete = []
    for s in sites:
        if (cfg.out / s / MANIFEST).is_file():
            diff = identity_differences(Manifest.read(cfg.out / s).capture, ident)
            if diff:
                return "error", (f"{cfg.out / s} already holds a capture with other options ({diff}); pick another "
                                 "--out or delete that store.")
            complete.append(s)
        elif (cfg.out / s).exists() and any((cfg.out / s).iterdir()):
            return "error", (f"{cfg.out / s} exists and is not an activation store of this capture; pick another "
                             "--out or delete it.")
    if complete and len(complete) == len(sites):
        return "complete", ""
    if complete:
        return "error", (f"{cfg.out}: {complete} are already captured but {sorted(set(sites) - set(complete))} are "
                         "not; capture the missing sites in a separate run (--sites with only those).")
    _start_run(run_path, cfg, world)
    return "capture", ""


def _fingerprint(cfg: CaptureConfig) -> list[list[Any]]:
    """(path, size, mtime) of every input file: a resumed run must read the same data."""
    out: list[list[Any]] = []
    for path, _ in resolve_files(cfg.data, cfg.format):
        st = path.stat()
        out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _model_fingerprint(cfg: CaptureConfig) -> list[list[Any]]:
    """(name, size, mtime) of the checkpoint's files (the GGUF file, or the directory's top-level files): the
    path alone would not notice a checkpoint replaced in place. Cheap: no weight is read."""
    ckpt = Path(cfg.ckpt_dir)
    files = [ckpt] if ckpt.is_file() else sorted(p for p in ckpt.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _start_run(run_path: Path, cfg: CaptureConfig, world: int) -> dict[str, Any]:
    run = {"identity": cfg.identity(), "world": world, "data_fingerprint": _fingerprint(cfg),
           "model_fingerprint": _model_fingerprint(cfg),
           "started": datetime.datetime.now().isoformat(timespec="seconds")}
    run_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_path, run)
    return run


def _has_progress(state: Path) -> bool:
    """Whether any rank committed documents (or the run reached finalisation)."""
    if (state / "finalize.json").is_file():
        return True
    for p in state.glob("progress-r*of*.json"):
        try:
            if Progress.read(p).docs_done > 0:
                return True
        except ValueError:  # unreadable: count it as progress, so nothing is thrown away unasked
            return True
    return False


def remove_uncommitted(part_dir: Path, committed: list[ShardEntry]) -> None:
    """Shards or temporary files a killed writer left behind that its progress file does not list."""
    keep = {e["file"] for e in committed}
    if part_dir.is_dir():
        for p in part_dir.iterdir():
            if p.name not in keep:
                p.unlink()




# --------------------------------------------------------------------------- finalize
def describe_model(cfg: CaptureConfig, params: Any, tokenizer: Any) -> dict[str, Any]:
    """The manifest fields that say which model and tokenizer produced the rows."""
    tok_path = getattr(tokenizer, "model_path", None) or getattr(tokenizer, "name", "")
    return {"d_model": params.dim, "model_args": dataclasses.asdict(params), "tokenizer": str(tok_path),
            "model": checkpoint_name(cfg.ckpt_dir)}


def finalize(cfg: CaptureConfig, sites: list[str], world: int, model: dict[str, Any]) -> None:
    """Rank 0, after every rank finished: parts -> OUT/<site>/shard-NNNNNN, manifests, remove run state.
    ``model``: the manifests' model fields (``_describe_model``)."""
    state = state_dir(cfg)
    plan_path = state / "finalize.json"
    if not plan_path.is_file():
        progresses = []
        for r in range(world):
            p = progress_path(cfg, r, world)
            prog = Progress.read(p) if p.is_file() else None
            if prog is None or not prog.finished:
                raise RuntimeError(f"rank {r} has not finished its share ({p}); on several nodes OUT must be on a "
                                   "filesystem all nodes share. Re-run the capture to finish it.")
            progresses.append(prog)
        counters: dict[str, int] = {}
        for prog in progresses:
            for k, v in prog.counters.items():
                counters[k] = counters.get(k, 0) + v
        moves: list[tuple[str, str]] = []
        manifests = {}
        run = json.loads((state / "run.json").read_text())
        for s in sites:
            entries: list[ShardEntry] = []
            for r, prog in enumerate(progresses):
                for e in prog.shards[s]:
                    dst = shard_name(len(entries))
                    moves.append((f"{s}/{PARTS_DIR}/r{r}of{world}/{e['file']}", f"{s}/{dst}"))
                    entries.append({**e, "file": dst, "rank": r})
            manifests[s] = Manifest(
                **model, dtype=DTYPE_NAMES[DTYPES[cfg.dtype]], site=s, shards=entries, bos=cfg.bos,
                first_token_excluded=not cfg.store_first_token, num_rows=sum(e["rows"] for e in entries),
                num_docs=counters.get("docs", 0), num_tokens=counters.get("tokens", 0), capture=run["identity"],
                world_size=world, counters=counters, started=run.get("started"),
                finished=datetime.datetime.now().isoformat(timespec="seconds")).to_dict()
        atomic_write_json(plan_path, {"moves": moves, "manifests": manifests})
    plan = json.loads(plan_path.read_text())
    for src, dst in plan["moves"]:
        if (cfg.out / src).is_file():
            os.replace(cfg.out / src, cfg.out / dst)
        elif not (cfg.out / dst).is_file():
            raise RuntimeError(f"finalizing {cfg.out}: neither {src} nor {dst} exists; the store is damaged. "
                               "Delete OUT and capture again.")
    for s, manifest in plan["manifests"].items():
        Manifest.from_dict(manifest, plan_path).write(cfg.out / s)
    for s in plan["manifests"]:
        shutil.rmtree(cfg.out / s / PARTS_DIR, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
