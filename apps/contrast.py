"""``llama3-sae contrast``: the latents whose activation most separates two sets of texts (see
``sae.contrast``), or one text from the corpus the top examples were computed on; optionally reranked by
how well their labels match a query. Each row names the latent's label and the command for its page.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from rich.console import Console
from rich.table import Table

from llama3_sae.config import parse_config
from sae.contrast import Contrast, Lift, contrast, contrast_with_baseline, rerank_by_query

from .engine import Engine, ModelOptions


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """The texts of a file: one per non-empty line of a .txt, the ``text_field`` of each line of a .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (one text per line, or a .jsonl with a {text_field!r} field)")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            return [str(json.loads(line)[text_field]) for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: every line must be a JSON object with a {text_field!r} field ({e})") from None
    return lines


@dataclass
class ContrastConfig(ModelOptions):
    """``llama3-sae contrast``: latents that separate two sets of texts."""

    sae: Path | None = None
    """SAE directory (labels from latents.jsonl; the corpus baseline from top_examples.jsonl)."""
    a: tuple[Path, ...] = ()
    """Files of the texts of set A: one text per line (.txt) or a .jsonl with a "text" field."""
    b: tuple[Path, ...] = ()
    """Files of set B. Without --b, set A (one or more texts) is compared with the corpus baseline."""
    a_text: list[str] = field(default_factory=list, metadata={"one_per_flag": True})
    """A text of set A given on the command line (repeat the flag for more)."""
    b_text: list[str] = field(default_factory=list, metadata={"one_per_flag": True})
    """A text of set B given on the command line."""
    query: str | None = None
    """Rerank the results by how well their labels match these words (e.g. "weather rain")."""
    direction: Literal["a", "b", "both"] = "a"
    """a: latents stronger in A; b: stronger in B; both: by the size of the difference."""
    top: int = 20
    """Rows shown."""
    json: bool = False
    """Print the rows as JSON."""
    site: str | None = None
    """Hook site of the SAE when its files do not say."""

    def __post_init__(self) -> None:
        if self.sae is None:
            raise ValueError("--sae is required: the SAE whose latents to contrast")
        if not (self.a or self.a_text):
            raise ValueError("give set A with --a FILE or --a-text TEXT (and set B with --b / --b-text, or none to "
                             "compare with the corpus)")
        if self.top < 1:
            raise ValueError(f"--top must be >= 1, got {self.top}")

    def texts(self) -> tuple[list[str], list[str]]:
        a = [t for p in self.a for t in read_texts(p)] + list(self.a_text)
        b = [t for p in self.b for t in read_texts(p)] + list(self.b_text)
        return a, b


def run_contrast(engine: Engine, a: Sequence[str], b: Sequence[str], *, query: str | None = None,
                 direction: str = "a", top: int = 20) -> list[Contrast] | list[Lift]:
    """Contrast rows (two sets) or lifts over the corpus baseline (no B)."""
    if not a:
        raise ValueError("set A is empty")
    labels = {lat: engine.catalog.label(lat) for lat in range(engine.n_latents)} if query else {}
    means_a = engine.mean_codes(engine.encode_texts(list(a)))
    if b:
        rows: list = contrast(means_a, engine.mean_codes(engine.encode_texts(list(b))),
                              top=top * 5 if query else top, direction=direction)
    else:
        baseline = engine.catalog.mean_acts_tensor()
        if baseline is None:
            raise ValueError("no set B and no corpus baseline: give --b, or run `llama3-sae top-examples` for the SAE "
                             "(its statistics are the baseline)")
        rows = contrast_with_baseline(means_a.mean(0), baseline, top=top * 5 if query else top)
    if query:
        rows = rerank_by_query(rows, labels, query)
    return rows[:top]


def _table(engine: Engine, rows: list, sae_dir: Path, two_sets: bool) -> Table:
    table = Table(title="latents stronger in A than in B (Welch's t; p Bonferroni-adjusted)" if two_sets else
                  "latents above the corpus baseline (mean activation per token)", title_justify="left")
    for col in (["latent", "label", "mean A", "mean B", "t", "p adj", "fired A/B"] if two_sets else
                ["latent", "label", "mean", "corpus", "lift"]):
        table.add_column(col, justify="left" if col == "label" else "right")
    for r in rows:
        label = engine.catalog.label(r.latent)
        if two_sets:
            table.add_row(str(r.latent), label, f"{r.mean_a:.3f}", f"{r.mean_b:.3f}", f"{r.t:+.2f}",
                          f"{r.p_adjusted:.2g}", f"{r.active_a:.0%}/{r.active_b:.0%}")
        else:
            table.add_row(str(r.latent), label, f"{r.mean:.3f}", f"{r.baseline:.3f}", f"{r.lift:+.3f}")
    table.caption = f"a latent's page: llama3-sae latent --sae {sae_dir} LATENT"
    return table


def main_contrast(argv: list[str] | None = None, prog: str = "llama3-sae contrast") -> int:
    cfg = parse_config(ContrastConfig, argv, prog, __doc__, usage_errors=True,
                       epilog="examples:\n  llama3-sae contrast --sae SAE_DIR --a weather.txt --b sport.txt\n"
                              "  llama3-sae contrast --sae SAE_DIR --a-text \"It rained all night.\" --query weather")
    a, b = cfg.texts()
    engine = Engine.load(cfg, cfg.sae, cfg.site, max_batch_size=1, generates=False)
    rows = run_contrast(engine, a, b, query=cfg.query, direction=cfg.direction, top=cfg.top)
    if cfg.json:
        out: list[dict[str, Any]] = [{**asdict(r), "label": engine.catalog.label(r.latent)} for r in rows]
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        Console().print(_table(engine, rows, Path(cfg.sae), bool(b)))
    return 0
