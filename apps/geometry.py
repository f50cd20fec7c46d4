"""``llama3-sae geometry``: how the latents of two SAEs relate -- matched, split and novel latents by decoder
cosine (``sae.geometry``), with examples of splits, a JSON report and a 2-D map of the decoder directions
(UMAP with umap-learn installed, else PCA) coloured by match kind and by label group.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llama3_sae.config import parse_config
from llama3_sae.files import atomic_write_json
from sae import load_sae
from sae.geometry import Matching, match_latents, project_2d

from .latents import UNLABELLED, LatentCatalog

REPORT, MAP = "geometry.json", "geometry.png"
KIND_COLOURS = {"matched": "#2e86de", "split": "#e67e22", "near": "#95a5a6", "novel": "#c0392b"}


@dataclass
class GeometryConfig:
    """``llama3-sae geometry``: match the latents of SAE B against SAE A."""

    a: Path | None = None
    """SAE A (e.g. the narrower one)."""
    b: Path | None = None
    """SAE B (e.g. the wider one, another seed or the next layer)."""
    out: Path | None = None
    """Directory for geometry.json and geometry.png (default: B's directory)."""
    match: float = 0.7
    """A mutual best match at this cosine or more is "matched"."""
    split: float = 0.5
    """A best match below this cosine is "novel"; several B latents above it sharing one A latent "split" it."""
    show: int = 8
    """Splits listed in the terminal."""
    plots: bool = True
    """Write the 2-D map (needs matplotlib)."""

    def __post_init__(self) -> None:
        if self.a is None or self.b is None:
            raise ValueError("give both SAEs: --a SAE_DIR --b SAE_DIR")
        self.a, self.b = Path(self.a), Path(self.b)
        self.out = Path(self.out) if self.out is not None else self.b


def label_group(label: str) -> str:
    """A coarse group for colouring a map: the first word of four or more letters in the label (for a
    heuristic label, its first such firing token), lowercased; punctuation and short function words
    ("the", "and", ",") say nothing about a latent's topic."""
    if label == UNLABELLED:
        return UNLABELLED
    quoted = re.findall(r"'([^']+)'", label) or label.split()
    for word in quoted:
        w = word.strip().lower()
        if len(w) >= 4 and w.isalpha() and w not in ("fires", "with", "that", "this", "from", "when"):
            return w
    return UNLABELLED


def report(m: Matching, labels_a: LatentCatalog, labels_b: LatentCatalog, cfg: GeometryConfig) -> dict[str, Any]:
    splits = sorted(m.splits.items(), key=lambda kv: -len(kv[1]))
    return {"a": str(cfg.a), "b": str(cfg.b), "thresholds": {"match": cfg.match, "split": cfg.split},
            "counts": m.counts(), "mean_best_cosine": float(m.cosine.mean()),
            "splits": [{"a": a, "a_label": labels_a.label(a),
                        "b": [{"latent": b, "label": labels_b.label(b), "cosine": float(m.cosine[b])} for b in bs]}
                       for a, bs in splits],
            "latents": [{"b": i, "best_a": int(m.best[i]), "cosine": float(m.cosine[i]), "kind": m.kind[i]}
                        for i in range(len(m.kind))]}


def plot_map(dec_b: Any, m: Matching, labels_b: LatentCatalog, path: Path) -> tuple[Path, str]:
    """Two panels of B's decoder directions in 2-D: by match kind, and by label group (the 9 largest)."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency)

    coords, method = project_2d(dec_b)
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    ax_kind, ax_label = fig.subplots(1, 2)
    for kind, colour in KIND_COLOURS.items():
        idx = [i for i, k in enumerate(m.kind) if k == kind]
        if idx:
            ax_kind.scatter(coords[idx, 0], coords[idx, 1], s=6, c=colour, label=f"{kind} ({len(idx)})")
    ax_kind.legend(fontsize="small", markerscale=2)
    ax_kind.set_title(f"SAE B's decoder directions ({method}) by match to A")
    groups = [label_group(labels_b.label(i)) for i in range(len(m.kind))]
    common = [g for g, _ in Counter(g for g in groups if g != UNLABELLED).most_common(9)]
    other = [i for i, g in enumerate(groups) if g not in common]
    ax_label.scatter(coords[other, 0], coords[other, 1], s=4, c="#d0d0d0", label="other / unlabelled")
    for g in common:
        idx = [i for i, x in enumerate(groups) if x == g]
        ax_label.scatter(coords[idx, 0], coords[idx, 1], s=8, label=f"{g} ({len(idx)})")
    ax_label.legend(fontsize="small", markerscale=2)
    ax_label.set_title("by label group")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path, method


def run_geometry(cfg: GeometryConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    sae_a, sae_b = load_sae(cfg.a, device="cpu"), load_sae(cfg.b, device="cpu")
    m = match_latents(sae_a.W_dec, sae_b.W_dec, match=cfg.match, split=cfg.split)
    labels_a = LatentCatalog.from_dir(cfg.a, sae_a.cfg.n_latents)
    labels_b = LatentCatalog.from_dir(cfg.b, sae_b.cfg.n_latents)
    rep = report(m, labels_a, labels_b, cfg)
    c = rep["counts"]
    console.print(f"B ({sae_b.cfg.n_latents:,} latents) against A ({sae_a.cfg.n_latents:,}): {c['matched']:,} matched, "
                  f"{c['split']:,} in splits of {len(m.splits):,} A latents, {c['near']:,} near, {c['novel']:,} novel "
                  f"(cosine >= {cfg.match} mutual / >= {cfg.split}); mean best cosine {rep['mean_best_cosine']:.3f}")
    table = Table(title="largest splits: one A latent, several B latents", title_justify="left")
    for col in ("A latent", "A label", "B latents (cosine)"):
        table.add_column(col)
    for s in rep["splits"][:cfg.show]:
        table.add_row(str(s["a"]), s["a_label"], "; ".join(f"{b['latent']} {b['label']} ({b['cosine']:.2f})"
                                                           for b in s["b"]))
    if rep["splits"]:
        console.print(table)
    assert cfg.out is not None
    if cfg.plots:
        try:
            path, method = plot_map(sae_b.W_dec, m, labels_b, cfg.out / MAP)
            rep["map"], rep["map_method"] = str(path), method
            console.print(f"map ({method}): {path}")
        except ImportError:
            console.print("note: matplotlib is not installed, so no map was drawn (pip install 'llama3-sae[plots]')")
    atomic_write_json(cfg.out / REPORT, rep, indent=1)
    console.print(f"report: {cfg.out / REPORT}")
    return rep


def main_geometry(argv: list[str] | None = None, prog: str = "llama3-sae geometry") -> int:
    cfg = parse_config(GeometryConfig, argv, prog, __doc__, usage_errors=True,
                       epilog="example:\n  llama3-sae geometry --a sae-4k --b sae-16k")
    run_geometry(cfg)
    return 0
