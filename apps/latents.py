"""What the apps know about each latent of an SAE: its label and the activations seen in its top examples.

Labels come from ``SAE_DIR/latents.jsonl`` (written by ``llama3-sae interpret`` or the local heuristic);
activation ranges from the ``stats`` of ``SAE_DIR/top_examples.jsonl`` (``llama3-sae top-examples``).
Both are optional: an SAE without them still steers, its latents are just "unlabelled" and the slider
range falls back to a default.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interpret.records import EXAMPLES_FILE, EXAMPLES_META, LatentExamples
from sae.io import read_latents

# The stats object sits near the start of each line, before the (large) documents; reading only a prefix
# keeps a scan of a multi-GB file to reading it once, without parsing the documents.
_STATS = re.compile(r'"stats":\s*(\{[^{}]*\})')
_PREFIX_CHARS = 2048
UNLABELLED = "(unlabelled)"


@dataclass(frozen=True)
class LatentInfo:
    latent: int
    label: str
    """The label, or UNLABELLED."""
    source: str | None
    """Where the label came from (an LLM name, or "heuristic:..."); None when unlabelled."""
    certainty: float | None
    max_act: float | None
    """Largest activation seen over the top-examples pass; None without top examples."""

    @property
    def heuristic(self) -> bool:
        return bool(self.source and self.source.startswith("heuristic"))


class LatentCatalog:
    """Labels and activation ranges of one SAE's latents, read once from its directory."""

    def __init__(self, n_latents: int, labels: dict[int, dict[str, Any]] | None = None,
                 max_acts: dict[int, float] | None = None, examples: ExamplesIndex | None = None):
        self.n_latents = n_latents
        self.labels = {k: v for k, v in (labels or {}).items() if 0 <= k < n_latents}
        self.max_acts = {k: v for k, v in (max_acts or {}).items() if 0 <= k < n_latents}
        self._examples = examples

    @classmethod
    def from_dir(cls, sae_dir: str | Path | None, n_latents: int) -> "LatentCatalog":
        if sae_dir is None or not Path(sae_dir).is_dir():
            return cls(n_latents)
        sae_dir = Path(sae_dir)
        index = ExamplesIndex.scan(sae_dir)
        return cls(n_latents, read_latents(sae_dir), index.max_acts if index else {}, index)

    @property
    def has_examples(self) -> bool:
        """Whether a finished top-examples run is beside the SAE."""
        return self._examples is not None

    def mean_acts_tensor(self) -> torch.Tensor | None:
        """[n_latents] per-token mean activation of every latent over the top-examples pass (None without it)."""
        if self._examples is None:
            return None
        out = torch.zeros(self.n_latents, dtype=torch.float64)
        for latent, v in self._examples.mean_acts.items():
            if 0 <= latent < self.n_latents:
                out[latent] = v
        return out

    def examples(self, latent: int) -> LatentExamples | None:
        """The latent's record of ``top_examples.jsonl`` (None without a finished top-examples run)."""
        self.check(latent)
        return self._examples.read(latent) if self._examples is not None else None

    # ------------------------------------------------------------------ lookups
    def info(self, latent: int) -> LatentInfo:
        self.check(latent)
        rec = self.labels.get(latent, {})
        label = str(rec.get("label") or "").strip() or UNLABELLED
        certainty = rec.get("certainty")
        return LatentInfo(latent, label, rec.get("source") if label != UNLABELLED else None,
                          float(certainty) if isinstance(certainty, (int, float)) else None,
                          self.max_acts.get(latent))

    def label(self, latent: int) -> str:
        return self.info(latent).label

    def check(self, latent: int, what: str = "latent") -> int:
        """``latent`` if it is a valid index, else a ValueError that names the valid range."""
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < self.n_latents:
            raise ValueError(f"{what} {latent!r} is out of range: this SAE has latents 0..{self.n_latents - 1}")
        return latent

    @property
    def label_sources(self) -> list[str]:
        return sorted({str(r.get("source")) for r in self.labels.values() if r.get("label") and r.get("source")})

    @property
    def all_heuristic(self) -> bool:
        """True when there are labels and every one of them comes from the local heuristic (no LLM)."""
        sources = self.label_sources
        return bool(sources) and all(s.startswith("heuristic") for s in sources)

    def provenance(self) -> str:
        """One line for the user: where the labels come from."""
        if not self.labels:
            return "no labels (run `llama3-sae top-examples` then `llama3-sae interpret`)"
        if self.all_heuristic:
            return (f"{len(self.labels)} labels from a local heuristic (top tokens, no LLM; set ANTHROPIC_API_KEY "
                    "and run `llama3-sae interpret` for LLM labels)")
        return f"{len(self.labels)} labels from " + ", ".join(self.label_sources)

    def search(self, query: str, limit: int = 20) -> list[LatentInfo]:
        """Latents whose label has a word starting with each word of ``query`` (case-insensitive: "rain"
        finds "rain" and "rainfall", not "trained"), clearest labels first; a bare number also finds that
        latent. Empty query: no results."""
        query = query.strip()
        if not query:
            return []
        exact = [self.info(int(query))] if query.isdigit() and int(query) < self.n_latents else []
        patterns = [re.compile(r"(?<!\w)" + re.escape(w), re.IGNORECASE) for w in query.split()]
        labelled = [self.info(latent) for latent, rec in self.labels.items()
                    if all(p.search(str(rec.get("label") or "")) for p in patterns)
                    and not (exact and exact[0].latent == latent)]
        # Clearest labels first (by the labeller's certainty), then by index.
        labelled.sort(key=lambda i: (-(i.certainty or 0.0), i.latent))
        return (exact + labelled)[:limit]

    def slider_range(self, latent: int, default: float = 10.0, factor: float = 4.0) -> tuple[float, float]:
        """Range of a steering slider (the value added to the latent): +-``factor`` x the largest activation
        seen in the top examples, so a latent can be pushed well past its strongest natural firing or
        switched off. ``default`` when no top examples were computed (or the latent never fired)."""
        top = self.max_acts.get(self.check(latent))
        bound = factor * top if top and top > 0 else default
        bound = float(f"{bound:.3g}")  # a slider shows its ends: 3 significant digits are plenty
        return -bound, bound


@dataclass
class ExamplesIndex:
    """Where each latent's line of ``top_examples.jsonl`` starts, and its largest activation: read in one pass
    over the file (only each line's start is parsed), so a latent's record is one seek and one line later."""

    path: Path
    offsets: dict[int, int]
    max_acts: dict[int, float]
    mean_acts: dict[int, float]
    """Per-token mean activation over the pass (stats sum / tokens): the corpus baseline of contrast."""

    @classmethod
    def scan(cls, sae_dir: Path) -> ExamplesIndex | None:
        """None when the file is absent or the top-examples run did not finish (its numbers would be partial)."""
        meta_path, path = sae_dir / EXAMPLES_META, sae_dir / EXAMPLES_FILE
        if not (meta_path.is_file() and path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            return None
        if not meta.get("complete"):
            return None
        offsets: dict[int, int] = {}
        max_acts: dict[int, float] = {}
        mean_acts: dict[int, float] = {}
        with open(path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, 1):
                head = raw[:_PREFIX_CHARS].decode("utf-8", errors="replace")
                m = _STATS.search(head)
                latent = re.match(r'\{"latent":\s*(\d+)', head)
                if m is None or latent is None:
                    raise ValueError(f"{path}:{lineno}: no latent index or stats at the start of the line; rerun "
                                     "`llama3-sae top-examples`")
                index = int(latent.group(1))
                offsets[index] = offset
                stats = json.loads(m.group(1))
                value = stats.get("max")
                if isinstance(value, (int, float)) and value > 0:
                    max_acts[index] = float(value)
                if stats.get("tokens"):
                    mean_acts[index] = float(stats.get("sum", 0.0)) / float(stats["tokens"])
                offset += len(raw)
        return cls(path, offsets, max_acts, mean_acts)

    def read(self, latent: int) -> LatentExamples | None:
        offset = self.offsets.get(latent)
        if offset is None:
            return None
        with open(self.path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            return LatentExamples.from_json(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: the record of latent {latent} is damaged ({e}); rerun top-examples "
                             "(or it was rewritten since the app started)") from None


def read_max_activations(sae_dir: Path) -> dict[int, float]:
    """{latent: largest activation seen} from ``top_examples.jsonl``; {} when the file is absent or the
    top-examples run did not finish."""
    index = ExamplesIndex.scan(sae_dir)
    return index.max_acts if index is not None else {}
