"""The scan's data structures for ``top-examples``: order-independent hashing and top-N merging, the
per-latent tables kept on the device, the per-group reduction, the work directory that makes a run
resumable, and the selection made from the tables. The passes over the text are in ``interpret.examples``."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from llama3_sae.files import atomic_path, atomic_write_json

from .config import TopExamplesConfig
from .records import AGGREGATIONS

STATE = "state.json"
MASK31 = (1 << 31) - 1
# Salts of the three independent pseudo-random streams.
SALT_RESERVOIR, SALT_POOL, SALT_RANDOM = 0x1B873593, 0x2E1B2138, 0x5F356495


# ---------------------------------------------------------------------- hashing and merging
def _mix31(x: torch.Tensor) -> torch.Tensor:
    # Integer mixing on values < 2^31 with a multiplier < 2^27, so int64 products never overflow
    # (overflow of signed integers is not something to rely on across devices).
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK31
    return x ^ (x >> 16)


def hash_keys(doc_ids: torch.Tensor, latents: torch.Tensor | None, seed: int, salt: int) -> torch.Tensor:
    """Pseudo-random int64 keys in [0, 2^31): [G] for documents, [G, L] for (document, latent) pairs.
    A fixed function of its inputs, so any order of processing keeps the same largest keys."""
    h = _mix31((doc_ids & MASK31) ^ ((seed * 0x9E3779B1 + salt) & MASK31))
    h = _mix31(h ^ (doc_ids >> 31))
    if latents is not None:
        h = _mix31(h[:, None] ^ latents[None, :])
    return h


def merge_top(vals: torch.Tensor, ids: torch.Tensor, cand_vals: torch.Tensor, cand_ids: torch.Tensor,
              extra: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Keep the ``vals.shape[-1]`` largest of the running table and the candidates, along the last dim,
    largest first; equal values are ordered by id (smaller first), so the result does not depend on the
    order in which documents arrive (activations at a document's first token are often exactly equal).

    vals/ids: [..., N]; cand_vals/cand_ids: [..., G] (cand_ids broadcast). ``extra`` = (running, candidate)
    payload carried along (the reservoir's activation values)."""
    n = vals.shape[-1]
    v = torch.cat([vals, cand_vals], -1)
    i = torch.cat([ids, cand_ids.expand_as(cand_vals)], -1)
    by_id = i.argsort(dim=-1, stable=True)
    order = by_id.gather(-1, v.gather(-1, by_id).argsort(dim=-1, descending=True, stable=True))[..., :n]
    out = (v.gather(-1, order), i.gather(-1, order))
    if extra is not None:
        e = torch.cat([extra[0], extra[1]], -1)
        out += (e.gather(-1, order),)
    return out


# ---------------------------------------------------------------------- the scan tables
class Tables:
    """Everything the scan keeps, on the device; saved and loaded as one safetensors file."""

    def __init__(self, n_latents: int, cfg: TopExamplesConfig, device: torch.device):
        L, N, R, P = n_latents, cfg.top_n, cfg.reservoir, cfg.random_pool
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.t: dict[str, torch.Tensor] = {}
        for agg in AGGREGATIONS:
            self.t[f"top_{agg}_val"] = torch.full((L, N), -torch.inf, **f32)
            self.t[f"top_{agg}_doc"] = torch.full((L, N), -1, **i64)
        self.t["res_key"] = torch.full((L, R), -1, **i64)
        self.t["res_doc"] = torch.full((L, R), -1, **i64)
        self.t["res_val"] = torch.zeros((L, R), **f32)
        self.t["pool_key"] = torch.full((max(P, 1),), -1, **i64)
        self.t["pool_doc"] = torch.full((max(P, 1),), -1, **i64)
        self.t["active_docs"] = torch.zeros(L, **i64)
        self.t["active_tokens"] = torch.zeros(L, **i64)
        self.t["max"] = torch.zeros(L, **f32)
        self.t["sum"] = torch.zeros(L, dtype=torch.float64, device=device)
        # Filled by the detail pass: each latent's non-activating random documents.
        self.t["rand_key"] = torch.full((L, max(cfg.random_examples, 1)), -1, **i64)
        self.t["rand_doc"] = torch.full((L, max(cfg.random_examples, 1)), -1, **i64)

    def cpu(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.t.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in self.t.items():
            if k not in tensors or tensors[k].shape != v.shape:
                raise ValueError(f"the saved top-examples state does not match this SAE/config (table {k}); "
                                 "rerun with --overwrite to start over")
            v.copy_(tensors[k])


class Aggregator:
    """Per-group SAE encoding and reduction to [documents, latents] tables, within a memory budget."""

    def __init__(self, sae: Any, n_latents: int, memory_mb: float):
        self.sae = sae
        self.L = n_latents
        budget = memory_mb * 2**20
        # The encoder holds a dense [rows, L] pre-activation plus top-k temporaries (~3 copies of 4 bytes).
        self.rows_per_chunk = max(1, int(budget // (n_latents * 12)))
        # The reduction holds ~6 [docs, L] float32 tables, the int64 hash keys with their temporaries, and
        # the [L, N + docs] concatenations of the merges: ~96 bytes per (document, latent).
        self.docs_per_group = max(1, int(budget // (n_latents * 96)))

    def codes(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(row offset, values [r, m] float32, indices [r, m]) of x [n, d], in row chunks."""
        for r0 in range(0, x.shape[0], self.rows_per_chunk):
            code = self.sae.encode(x[r0:r0 + self.rows_per_chunk], sparse=True)
            yield r0, code.values.float(), code.indices

    def reduce(self, x: torch.Tensor, tok_doc: torch.Tensor, tok_last: torch.Tensor, n_docs: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, d] credited tokens of ``n_docs`` documents (tok_doc: local index, tok_last: is the
        document's last token) -> (max, sum, last) [n_docs, L] float32 and active-token counts [L]."""
        L = self.L
        dmax = x.new_zeros(n_docs * L, dtype=torch.float32)
        dsum = torch.zeros_like(dmax)
        dlast = torch.zeros_like(dmax)
        active = torch.zeros(L, dtype=torch.int64, device=x.device)
        for r0, vals, idx in self.codes(x):
            r = vals.shape[0]
            on = vals > 0  # padding slots of thresholded SAEs hold 0
            flat = (tok_doc[r0:r0 + r, None] * L + idx)[on]
            v = vals[on]
            dmax.scatter_reduce_(0, flat, v, reduce="amax")
            dsum.scatter_add_(0, flat, v)
            last = (on & tok_last[r0:r0 + r, None])
            dlast.scatter_(0, (tok_doc[r0:r0 + r, None] * L + idx)[last], vals[last])
            active += torch.bincount(idx[on], minlength=L)
        return dmax.view(n_docs, L), dsum.view(n_docs, L), dlast.view(n_docs, L), active


def doc_groups(acts: torch.Tensor, keep: torch.Tensor, size: int
            ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Split a batch [B, T, d] into document groups; yield (g0, g1, x [n, d], tok_doc [n], tok_pos [n],
    tok_last [n]) for the credited tokens of each group."""
    B, T = keep.shape
    pos = torch.arange(T, device=keep.device)
    for g0 in range(0, B, size):
        g1 = min(B, g0 + size)
        k = keep[g0:g1]
        last_pos = torch.where(k, pos, -1).amax(1)  # [G] last credited position (-1: none)
        rows = torch.arange(g1 - g0, device=keep.device)[:, None].expand(-1, T)
        cols = pos[None, :].expand(g1 - g0, -1)
        tok_doc, tok_pos = rows[k], cols[k]
        yield g0, g1, acts[g0:g1][k], tok_doc, tok_pos, tok_pos == last_pos[tok_doc]


# ---------------------------------------------------------------------- state on disk
@dataclass
class ScanState:
    """``state.json`` in the work directory: how far a top-examples run got. Rewritten (atomically, after the
    files it names) at each save, so a killed run resumes from the last one."""

    identity: dict[str, Any]
    """The options that decide the result (``TopExamplesConfig.identity``)."""
    phase: Literal["scan", "detail", "write"] = "scan"
    docs_done: int = 0
    """Documents the scan pass has merged into the tables."""
    detail_docs_done: int = 0
    """Documents the detail pass has read again."""
    parts: list[str] = field(default_factory=list)
    """Detail part files written, in order."""
    counters: dict[str, int] = field(default_factory=dict)
    saves: int = 0
    tables: str | None = None
    """The tables file of the last save."""
    started: float = field(default_factory=time.time)


class WorkDir:
    def __init__(self, path: Path):
        self.path = path
        self.state_path = path / STATE

    def load(self) -> ScanState | None:
        if not self.state_path.exists():
            return None
        try:
            return ScanState(**json.loads(self.state_path.read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.state_path} is not a top-examples state file ({e}); pass --overwrite to "
                             "start over") from e

    def save(self, state: ScanState, tables: Tables) -> None:
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        n = state.saves + 1
        name = f"tables-{n:06d}.safetensors"
        with atomic_path(self.path / name) as tmp:
            save_file(tables.cpu(), str(tmp))
        old = state.tables
        state.saves, state.tables = n, name
        # The commit point: the tables and parts named here are complete.
        atomic_write_json(self.state_path, dataclasses.asdict(state))
        if old and old != name:
            (self.path / old).unlink(missing_ok=True)

    def load_tables(self, state: ScanState, tables: Tables) -> None:
        from safetensors.torch import load_file

        tables.load(load_file(str(self.path / state.tables)))

    def write_part(self, n: int, arrays: dict[str, np.ndarray]) -> str:
        from safetensors.numpy import save_file

        name = f"part-{n:06d}.safetensors"
        with atomic_path(self.path / name) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        return name

    def read_part(self, name: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.path / name))

    def remove_uncommitted(self, state: ScanState) -> None:
        keep = {state.tables, STATE, "config.json", *state.parts}
        for f in self.path.iterdir():
            if f.name not in keep:
                f.unlink()


# ---------------------------------------------------------------------- selection
@dataclass
class Selection:
    """What the scan chose, per latent (CPU, Python lists)."""

    top: dict[str, list[list[tuple[int, float]]]]
    quantiles: list[list[dict[str, Any]]]
    score_active: list[list[tuple[int, float]]]
    pool: list[int]

    def pairs(self) -> np.ndarray:
        """[n, 2] (doc, latent) pairs whose per-token activations the detail pass records, sorted."""
        out: list[tuple[int, int]] = []
        for lat in range(len(self.quantiles)):
            docs = {d for agg in AGGREGATIONS for d, _ in self.top[agg][lat]}
            docs |= {d for q in self.quantiles[lat] for d, _ in q["examples"]}
            docs |= {d for d, _ in self.score_active[lat]}
            out += [(d, lat) for d in docs]
        arr = np.array(sorted(out), dtype=np.int64).reshape(-1, 2)
        return arr


def select(tables: dict[str, torch.Tensor], cfg: TopExamplesConfig) -> Selection:
    L = tables["max"].shape[0]
    top: dict[str, list[list[tuple[int, float]]]] = {}
    for agg in AGGREGATIONS:
        vals, docs = tables[f"top_{agg}_val"].tolist(), tables[f"top_{agg}_doc"].tolist()
        top[agg] = [[(d, v) for d, v in zip(docs[i], vals[i]) if d >= 0 and v > -float("inf")] for i in range(L)]
    keys, rdocs, rvals = tables["res_key"].tolist(), tables["res_doc"].tolist(), tables["res_val"].tolist()
    quantiles, score_active = [], []
    for lat in range(L):
        in_top = {d for agg in AGGREGATIONS for d, _ in top[agg][lat]}
        items = sorted((v, -k, d) for k, d, v in zip(keys[lat], rdocs[lat], rvals[lat]) if k >= 0)
        n = len(items)
        bins, held = [], []
        used = set(in_top)
        for b in range(cfg.n_quantiles):
            chunk = items[b * n // cfg.n_quantiles:(b + 1) * n // cfg.n_quantiles]
            if not chunk:
                continue
            lo, hi = chunk[0][0], chunk[-1][0]
            # Within a bin, documents in key order: a uniform random order, fixed by the seed.
            order = sorted(chunk, key=lambda t: t[1])
            free = [(d, v) for v, _, d in order if d not in used]
            shown = free[: cfg.quantile_examples]
            used |= {d for d, _ in shown}
            bins.append({"lo": lo, "hi": hi, "examples": sorted(shown, key=lambda t: t[1])})
            held_bin = [(d, v) for d, v in free[cfg.quantile_examples:] if d not in used][: cfg.score_examples]
            used |= {d for d, _ in held_bin}
            held += held_bin
        quantiles.append(bins)
        score_active.append(held)
    pool = sorted(d for d, k in zip(tables["pool_doc"].tolist(), tables["pool_key"].tolist()) if k >= 0)
    return Selection(top, quantiles, score_active, pool if cfg.random_pool > 0 else [])
