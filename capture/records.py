"""The records a capture keeps on disk, typed, in one place: a store's ``manifest.json`` (``Manifest``) and
a capture rank's commit point (``Progress``). Each reads and writes its own JSON and says what is wrong
with a file that is not one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from llama3_sae.files import atomic_write_json

FORMAT = "llama3-sae-activations"
VERSION = 1
MANIFEST = "manifest.json"


class ShardEntry(TypedDict, total=False):
    """One shard as a manifest or a progress file lists it."""

    file: str
    rows: int
    sha256: str
    rank: int
    """The capture rank that wrote it (final stores)."""
    doc_range: list[int]
    """[first, last] document index in it."""


@dataclass
class Manifest:
    """``manifest.json``: what an activation store holds. ``d_model``, ``dtype``, ``site`` and ``shards`` are
    required; the rest describe where the rows came from (a capture writes all of them)."""

    d_model: int
    dtype: str
    """bfloat16, float16 or float32."""
    site: str
    shards: list[ShardEntry]
    num_rows: int = 0
    model: str | None = None
    """Name of the checkpoint the rows came from."""
    bos: bool | None = None
    first_token_excluded: bool | None = None
    model_args: dict[str, Any] | None = None
    tokenizer: str | None = None
    num_docs: int = 0
    num_tokens: int = 0
    capture: dict[str, Any] = field(default_factory=dict)
    """The capture options that decide the rows (``CaptureConfig.identity``)."""
    world_size: int = 1
    counters: dict[str, int] = field(default_factory=dict)
    started: str | None = None
    finished: str | None = None
    stats: dict[str, Any] | None = None
    """The statistics file ``llama3-sae preprocess`` wrote: {"file", "sha256", "rows", "mean_norm", ...}."""
    shuffled_store: str | None = None
    """Relative path of this store's globally shuffled copy."""
    shuffled: dict[str, Any] | None = None
    """In a shuffled copy: {"seed", "from", "buckets", "created"}."""
    format: str = FORMAT
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know (written back unchanged)."""

    @classmethod
    def from_dict(cls, data: Any, where: str | Path = MANIFEST) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"{where}: version {data.get('version')!r} is not supported (this code reads {VERSION})")
        for key in ("d_model", "dtype", "site", "shards"):
            if key not in data:
                raise ValueError(f"{where}: missing key {key!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        m = cls(**{k: v for k, v in data.items() if k in known},
                extra={k: v for k, v in data.items() if k not in known})
        if not m.num_rows:
            m.num_rows = sum(int(s["rows"]) for s in m.shards)
        return m

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {**out.pop("extra"), **out}

    @classmethod
    def read(cls, store: Path) -> Manifest:
        """The manifest of the store directory ``store`` (ValueError when it has none or it is not one)."""
        store = Path(store)
        path = store / MANIFEST
        if not path.is_file():
            partial = (store / ".parts").is_dir() or (store.parent / ".capture").is_dir()
            hint = (" A capture into it has not finished: re-run the same capture command to resume it."
                    if partial else " Pass the directory of one site, e.g. OUT/L8R, written by `llama3-sae capture`.")
            raise ValueError(f"{store} is not an activation store (no {MANIFEST}).{hint}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from e
        return cls.from_dict(data, path)

    def write(self, store: Path) -> None:
        atomic_write_json(Path(store) / MANIFEST, self.to_dict())


@dataclass
class Progress:
    """``progress-r{R}of{W}.json``: what capture rank R has committed. The writer process rewrites it after
    each shard is on disk, so only shards listed here count when a killed capture resumes."""

    rank: int
    world: int
    shards: dict[str, list[ShardEntry]]
    """site -> this rank's committed shards, in order."""
    docs_done: int = 0
    """Documents of this rank's share whose rows are all in committed shards."""
    finished: bool = False
    counters: dict[str, int] = field(default_factory=dict)

    @classmethod
    def new(cls, rank: int, world: int, sites: list[str]) -> Progress:
        return cls(rank, world, {s: [] for s in sites})

    @classmethod
    def read(cls, path: Path) -> Progress:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not a capture progress file ({e}); delete the capture's .capture "
                             "directory and its sites' .parts directories to start over") from e

    def commit(self, docs: int, counters: dict[str, int], *, finished: bool, path: Path) -> None:
        """Add ``docs`` documents and ``counters`` (the shards were appended already) and write the file."""
        self.docs_done += docs
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        self.finished = finished
        atomic_write_json(Path(path), dataclasses.asdict(self))
