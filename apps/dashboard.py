"""``llama3-sae export-dashboard``: an SAE's latents as feature dashboards, for Neuronpedia and for a browser.

OUT/neuronpedia/batch-N.json
    The layout SAEDashboard's Neuronpedia runner writes and Neuronpedia imports: ``{"model_id", "layer",
    "sae_set", "features": [...]}``, each feature with ``feature_index``, the promoted and suppressed
    output tokens (``pos_str``/``pos_values``, ``neg_str``/``neg_values``), ``frac_nonzero``, histograms of
    its nonzero activations (``freq_hist_data_bar_values``/``_heights``) and of its logit effects
    (``logits_hist_data_bar_*``), and ``activations``: the top examples (``bin_min`` -1) then the
    quantile samples (``bin_min``/``bin_max`` the bin's range), each with ``tokens`` and per-token
    ``values``. The activation histogram is over the quantile samples' tokens (a uniform sample of the
    documents the latent fired on), not over every token of the corpus.
OUT/neuronpedia/explanations.json
    The labels: ``[{"index", "description", "source", "certainty"}]``.
OUT/site/
    A static site that opens from disk: ``index.html`` (every latent with its label, density and max,
    and a search box) and ``latent-N.html`` per latent (the page the web app shows, plus the histogram).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from interpret.records import parse_latent_spec
from llama3.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from llama3_sae.config import parse_config
from llama3_sae.files import atomic_write_json, atomic_write_text
from llama3_sae.sites import parse_site
from sae import load_sae

from .latent_page import PAGE_CSS, LatentPage, build_page, decoder_logits, dense_values, page_html
from .latents import LatentCatalog

BATCH_DIR, SITE_DIR = "neuronpedia", "site"
HIST_BINS = 20


@dataclass
class DashboardConfig:
    """``llama3-sae export-dashboard``: Neuronpedia batches and a static site of an SAE's latents."""

    sae: Path | None = None
    """SAE directory, with top_examples.jsonl (from `llama3-sae top-examples`) and, for labels, latents.jsonl."""
    out: Path | None = None
    """Output directory (default: SAE/dashboard)."""
    ckpt_dir: Path | None = None
    """Model checkpoint for the output tokens: a .gguf file or a Meta / HF / GGUF directory. Default: the
    built-in SmolLM2-135M-Instruct."""
    latents: str = "all"
    """Latents to export: all, or indices and inclusive ranges such as 0-99,120."""
    batch_size: int = 128
    """Features per Neuronpedia batch file."""
    sae_set: str = "llama3-sae"
    """The Neuronpedia SAE set name written into the batches."""
    site: str | None = None
    """Hook site of the SAE when its files do not say."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (for the output-token projections)."""

    def __post_init__(self) -> None:
        if self.sae is None:
            raise ValueError("--sae is required")
        self.sae = Path(self.sae)
        self.out = Path(self.out) if self.out is not None else self.sae / "dashboard"
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def histogram(values: list[float], bins: int = HIST_BINS) -> tuple[list[float], list[int]]:
    """(bin centres, counts) of ``values`` over their range; ([], []) for none."""
    if not values:
        return [], []
    t = torch.tensor(values, dtype=torch.float64)
    lo, hi = float(t.min()), float(t.max())
    if hi <= lo:
        return [lo], [len(values)]
    counts = torch.histc(t, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    return [lo + width * (i + 0.5) for i in range(bins)], [int(c) for c in counts.tolist()]


def feature_record(page: LatentPage, logits: torch.Tensor | None) -> dict[str, Any]:
    """One feature in the Neuronpedia batch layout (see the module docstring)."""
    acts: list[dict[str, Any]] = []
    for doc in page.top_examples(20):
        acts.append({"bin_min": -1, "bin_max": -1, "bin_contains": -1, "tokens": doc.tokens,
                     "values": dense_values(doc)})
    sampled: list[float] = []
    n_active = max(int(page.stats.get("active_docs", 0)), 1)
    for lo, hi, docs in reversed(page.quantile_samples(per_bin=5)):
        for doc in docs:
            acts.append({"bin_min": lo, "bin_max": hi, "bin_contains": len(docs) / n_active, "tokens": doc.tokens,
                         "values": dense_values(doc)})
            sampled += [v for _, v in doc.acts if v > 0]
    freq_x, freq_y = histogram(sampled)
    logit_x, logit_y = histogram(logits.tolist()) if logits is not None else ([], [])
    out = page.outputs
    return {"feature_index": page.latent,
            "pos_str": [t for t, _ in out.positive] if out else [], "pos_values": [v for _, v in out.positive] if out
            else [], "neg_str": [t for t, _ in out.negative] if out else [],
            "neg_values": [v for _, v in out.negative] if out else [],
            "frac_nonzero": page.token_density or 0.0,
            "freq_hist_data_bar_values": freq_x, "freq_hist_data_bar_heights": freq_y,
            "logits_hist_data_bar_values": logit_x, "logits_hist_data_bar_heights": logit_y,
            "n_prompts_total": int(page.stats.get("docs", 0)), "n_tokens_in_prompt": 0, "dataset": "",
            "activations": acts}


def _bars_svg(xs: list[float], ys: list[int], title: str) -> str:
    if not ys:
        return ""
    top = max(ys) or 1
    w = 12
    bars = "".join(f'<rect x="{i * w}" y="{60 - 60 * y / top:.1f}" width="{w - 2}" height="{60 * y / top:.1f}">'
                   f"<title>{x:.3g}: {y}</title></rect>" for i, (x, y) in enumerate(zip(xs, ys)))
    return (f'<p>{html.escape(title)} ({xs[0]:.3g} to {xs[-1]:.3g})</p><svg width="{len(ys) * w}" height="62" '
            f'style="fill:#e67e22">{bars}</svg>')


SITE_CSS = PAGE_CSS + """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 1em auto; padding: 0 1em; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; }
tr:nth-child(even) { background: rgba(128,128,128,.08); }
"""


def latent_html(page: LatentPage, record: dict[str, Any], prev: int | None, nxt: int | None) -> str:
    """A latent's page of the site; ``prev`` / ``nxt``: the exported latents before and after it."""
    nav = ('<p><a href="index.html">all latents</a>'
           + (f' · <a href="latent-{prev}.html">previous</a>' if prev is not None else "")
           + (f' · <a href="latent-{nxt}.html">next</a>' if nxt is not None else "") + "</p>")
    hist = _bars_svg(record["freq_hist_data_bar_values"], record["freq_hist_data_bar_heights"],
                     "nonzero activations over the sampled documents")
    return (f"<!doctype html><meta charset=utf-8><title>latent {page.latent}</title><style>{SITE_CSS}</style>"
            f"{nav}{page_html(page)}{hist}")


def index_html(rows: list[tuple[int, str, float | None, float]]) -> str:
    body = "".join(f'<tr><td><a href="latent-{lat}.html">{lat}</a></td><td>{html.escape(label)}</td>'
                   f'<td>{"" if dens is None else f"{dens:.3%}"}</td><td>{mx:.3g}</td></tr>' for lat, label, dens, mx in rows)
    search = ("<input id=q placeholder='search labels' oninput=\"for (const r of document.querySelectorAll('tbody tr'))"
              " r.style.display = r.textContent.toLowerCase().includes(this.value.toLowerCase()) ? '' : 'none'\">")
    return (f"<!doctype html><meta charset=utf-8><title>latents</title><style>{SITE_CSS}</style>"
            f"<h2>{len(rows):,} latents</h2>{search}<table><thead><tr><th>latent</th><th>label</th><th>density</th>"
            f"<th>max</th></tr></thead><tbody>{body}</tbody></table>")


def export_dashboard(cfg: DashboardConfig, console: Console | None = None) -> Path:
    console = console or Console(stderr=True)
    sae = load_sae(cfg.sae, site=cfg.site, device=cfg.device)
    catalog = LatentCatalog.from_dir(cfg.sae, sae.cfg.n_latents)
    if not catalog.has_examples:
        raise ValueError(f"{cfg.sae} has no finished top_examples.jsonl: run `llama3-sae top-examples --sae {cfg.sae}` "
                         "first (the dashboards are its examples)")
    ckpt = resolve_checkpoint(cfg.ckpt_dir)
    model = load_model(ckpt, device=cfg.device, dtype=torch.float32)
    tokenizer = load_tokenizer(ckpt)
    if model.params.dim != sae.cfg.d_model:
        raise ValueError(f"the SAE reads d_model={sae.cfg.d_model} but {ckpt} has dim={model.params.dim}: pass the "
                         "SAE's model with --ckpt-dir")
    latents = parse_latent_spec(cfg.latents, sae.cfg.n_latents) or list(range(sae.cfg.n_latents))
    assert cfg.out is not None
    site_dir, batch_dir = cfg.out / SITE_DIR, cfg.out / BATCH_DIR
    site_dir.mkdir(parents=True, exist_ok=True)
    batch_dir.mkdir(parents=True, exist_ok=True)
    layer = parse_site(sae.cfg.site).layer if sae.cfg.site else 0
    features, rows, labels = [], [], []
    with Progress(console=console) as bar:
        task = bar.add_task("dashboards", total=len(latents))
        for i, lat in enumerate(latents):
            page = build_page(lat, catalog, sae=sae, model=model, tokenizer=tokenizer)
            record = feature_record(page, decoder_logits(sae, model, lat))
            features.append(record)
            prev, nxt = (latents[i - 1] if i else None), (latents[i + 1] if i + 1 < len(latents) else None)
            atomic_write_text(site_dir / f"latent-{lat}.html", latent_html(page, record, prev, nxt))
            rows.append((lat, page.info.label, page.token_density, float(page.stats.get("max", 0.0))))
            labels.append({"index": lat, "description": page.info.label, "source": page.info.source,
                           "certainty": page.info.certainty})
            if len(features) == cfg.batch_size or lat == latents[-1]:
                atomic_write_json(batch_dir / f"batch-{(len(rows) - 1) // cfg.batch_size}.json",
                                  {"model_id": sae.cfg.model_name or "", "layer": layer, "sae_set": cfg.sae_set,
                                   "features": features})
                features = []
            bar.advance(task)
    atomic_write_json(batch_dir / "explanations.json", labels, indent=1)
    atomic_write_text(site_dir / "index.html", index_html(rows))
    console.print(f"{len(rows):,} dashboards: {batch_dir} (Neuronpedia batches) and {site_dir / 'index.html'} "
                  "(open it in a browser)", highlight=False)
    return cfg.out


def main_export_dashboard(argv: list[str] | None = None, prog: str = "llama3-sae export-dashboard") -> int:
    cfg = parse_config(DashboardConfig, argv, prog, __doc__, usage_errors=True,
                       epilog="example:\n  llama3-sae export-dashboard --sae SAE_DIR --latents 0-499")
    export_dashboard(cfg)
    return 0
