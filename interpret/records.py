"""On-disk formats of the interpretation stage, read and written without torch.

Files beside the SAE (``SAE_DIR``):

``top_examples.jsonl``
    One JSON object per latent, ascending by latent, ``"latent"`` always the first key::

        {"latent": 17,
         "stats": {"docs": 100000, "tokens": 2730000,            # what the pass saw (same on every line)
                   "active_docs": 412, "active_tokens": 530,     # where this latent was > 0
                   "max": 12.3, "sum": 1540.2},                  # largest activation, sum over all tokens
         "top": {"max":  [[doc, value], ...],                    # top-N documents by max over tokens,
                 "mean": [[doc, value], ...],                    #   by mean over the document's tokens,
                 "last": [[doc, value], ...]},                   #   by the activation at the last token
         "quantiles": [{"lo": 0.05, "hi": 1.1, "examples": [[doc, max], ...]}, ...],  # weakest bin first
         "score_active": [[doc, max], ...],   # held-out activating documents for scoring (not in top/quantiles)
         "score_random": [doc, ...],          # random documents where the latent is 0 on every token
         "docs": {"<doc>": {"tokens": ["The", " cat", ...],     # the document's tokens as text
                            "acts": [[pos, value], ...]}}}      # this latent's nonzero activations

    ``doc`` is the document's index in the text source (0-based, in reading order). Token pieces are the
    exact decoded text: joined they give the document; a character split over several tokens belongs to
    the token that completes it (earlier pieces are ''). Lists hold fewer entries than asked when the
    latent fired on fewer documents; a latent that never fired has empty lists (and ``active_docs`` 0).

``top_examples.json``
    What produced the file: ``{"format": "llama3-sae-top-examples", "version": 1, "config": {...},
    "sae": ..., "site": ..., "model": ..., "n_latents": ..., "docs": ..., "tokens": ..., "aggregations":
    ["max", "mean", "last"], "complete": true}``.

``latents.jsonl``
    One JSON object per labelled latent, ascending: ``{"latent": 17, "label": "...", "certainty": 0.8,
    "scores": {"detection": {...}}, "source": "claude-sonnet-5-5" | "heuristic:top-tokens ..."}`` plus
    ``"reasoning"`` when an LLM gave it. Written atomically; lines of latents not touched are kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from sae import io as sae_io

EXAMPLES_FILE = "top_examples.jsonl"
EXAMPLES_META = "top_examples.json"
EXAMPLES_FORMAT = "llama3-sae-top-examples"
EXAMPLES_VERSION = 1
LATENTS_FILE = "latents.jsonl"
WORK_DIR = "interpret"
AGGREGATIONS = ("max", "mean", "last")

_LATENT_PREFIX = re.compile(r'^\{"latent":\s*(\d+)')


@dataclass
class DocExample:
    doc: int
    tokens: list[str]
    acts: list[tuple[int, float]]
    """(position, value) where this latent is nonzero, ascending by position."""

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def max_act(self) -> float:
        return max((v for _, v in self.acts), default=0.0)


@dataclass
class LatentExamples:
    latent: int
    stats: dict[str, Any]
    top: dict[str, list[tuple[int, float]]]
    quantiles: list[dict[str, Any]]
    score_active: list[tuple[int, float]]
    score_random: list[int]
    docs: dict[int, DocExample] = field(default_factory=dict)

    @property
    def is_dead(self) -> bool:
        return int(self.stats.get("active_docs", 0)) == 0

    def to_json(self) -> dict[str, Any]:
        return {"latent": self.latent, "stats": self.stats,
                "top": {a: [[d, v] for d, v in self.top.get(a, [])] for a in AGGREGATIONS},
                "quantiles": [{"lo": q["lo"], "hi": q["hi"], "examples": [[d, v] for d, v in q["examples"]]}
                              for q in self.quantiles],
                "score_active": [[d, v] for d, v in self.score_active],
                "score_random": list(self.score_random),
                "docs": {str(d): {"tokens": e.tokens, "acts": [[p, v] for p, v in e.acts]}
                         for d, e in sorted(self.docs.items())}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "LatentExamples":
        pairs = lambda xs: [(int(d), float(v)) for d, v in xs]  # noqa: E731
        docs = {int(k): DocExample(int(k), list(v["tokens"]), [(int(p), float(a)) for p, a in v["acts"]])
                for k, v in obj.get("docs", {}).items()}
        return cls(latent=int(obj["latent"]), stats=dict(obj.get("stats", {})),
                   top={a: pairs(obj.get("top", {}).get(a, [])) for a in AGGREGATIONS},
                   quantiles=[{"lo": float(q["lo"]), "hi": float(q["hi"]), "examples": pairs(q["examples"])}
                              for q in obj.get("quantiles", [])],
                   score_active=pairs(obj.get("score_active", [])),
                   score_random=[int(d) for d in obj.get("score_random", [])], docs=docs)


def parse_latent_spec(spec: str | None, n_latents: int | None = None) -> list[int] | None:
    """``"all"``/None -> None (every latent); ``"0-99,120"`` -> sorted unique indices (ranges inclusive)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"--latents {spec!r}: cannot read {part!r}; use indices and inclusive ranges, "
                             "e.g. 0-99,120 (or all)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"--latents {spec!r}: range {part!r} runs backwards; write it as {hi}-{lo}")
        out.update(range(lo, hi + 1))
    if n_latents is not None:
        bad = sorted(i for i in out if i >= n_latents)
        if bad:
            raise ValueError(f"--latents {spec!r}: {len(bad)} indices (first {bad[0]}) are past the SAE's "
                             f"{n_latents} latents (0..{n_latents - 1})")
    return sorted(out)


def read_examples_meta(sae_dir: Path) -> dict[str, Any]:
    path = Path(sae_dir) / EXAMPLES_META
    data = Path(sae_dir) / EXAMPLES_FILE
    if not path.is_file() or not data.is_file():
        raise FileNotFoundError(f"no top examples in {sae_dir} ({EXAMPLES_FILE} and {EXAMPLES_META}): run "
                                f"`llama3-sae top-examples --ckpt-dir DIR --sae {sae_dir} --data PATH` first")
    meta = json.loads(path.read_text())
    if meta.get("format") != EXAMPLES_FORMAT:
        raise ValueError(f"{path}: not a top-examples file of this project (format {meta.get('format')!r})")
    if meta.get("version", 0) > EXAMPLES_VERSION:
        raise ValueError(f"{path}: version {meta['version']} is newer than this code reads ({EXAMPLES_VERSION})")
    if not meta.get("complete"):
        raise ValueError(f"{path}: the top-examples run did not finish; rerun the same top-examples command "
                         "to resume it")
    return meta


def iter_examples(sae_dir: Path, latents: Iterable[int] | None = None) -> Iterator[LatentExamples]:
    """The records of ``latents`` (all when None), in file order. Lines of other latents are skipped
    without being parsed, which matters for files of tens of GB."""
    read_examples_meta(sae_dir)
    wanted = None if latents is None else set(latents)
    path = Path(sae_dir) / EXAMPLES_FILE
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if wanted is not None:
                m = _LATENT_PREFIX.match(line)
                if m is None:
                    raise ValueError(f"{path}:{lineno}: line does not start with a latent index")
                if int(m.group(1)) not in wanted:
                    continue
            try:
                yield LatentExamples.from_json(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: damaged record ({type(e).__name__}: {e}); rerun "
                                 "top-examples") from None


# ---------------------------------------------------------------------- latents.jsonl
# The file belongs to the SAE directory format, so reading and writing it is ``sae.io``'s job; these
# wrappers keep the records keyed by latent and put "latent" first on each line.
def read_latents(sae_dir: Path) -> dict[int, dict[str, Any]]:
    """{latent: record} from ``SAE_DIR/latents.jsonl`` ({} when there is none)."""
    return sae_io.read_latents(Path(sae_dir))


def write_latents(sae_dir: Path, records: dict[int, dict[str, Any]]) -> Path:
    """Write all records, ascending by latent, atomically (a kill leaves the old file or the new one)."""
    rows = [{"latent": latent, **{k: v for k, v in rec.items() if k != "latent"}} for latent, rec in records.items()]
    return sae_io.write_latents(Path(sae_dir) / LATENTS_FILE, rows)
