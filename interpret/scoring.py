"""Detection scoring of latent labels (as EleutherAI's delphi and Goodfire do).

For each labelled latent the LLM sees the label and a shuffled, unmarked mix of documents on which the
latent fires (held out from the labelling prompt) and random documents on which it never fires, and says
which fire. The score is the balanced accuracy, (TPR + TNR) / 2: 0.5 is chance, 1.0 means the label
tells the two apart perfectly. Balanced, so a labeller that answers "fires" everywhere gets 0.5 however
the mix is weighted.

Questions go through the same resumable ``JobRunner`` as labels (``SAE/interpret/score.*``). Scores
land in ``latents.jsonl`` under ``scores.detection`` only while the label they measured is still the
latent's label; a summary table is printed and a histogram written to ``SAE/interpret/detection_scores.png``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.table import Table

from llama3_sae.files import atomic_path

from .requests import Outcome, Request
from .config import ScoreConfig
from .jobs import LLMJob
from .parsing import ParseError, parse_detection
from .prompts import DETECTION_SYSTEM, detection_items, detection_prompt, message_params
from .records import iter_examples, parse_latent_spec, read_examples_meta, read_latents, write_latents

PLOT_FILE = "detection_scores.png"


def balanced_accuracy(answers: Sequence[int], truth: Sequence[int]) -> dict[str, float]:
    """``{"balanced_accuracy", "tpr", "tnr", "accuracy"}`` of 0/1 ``answers`` against 0/1 ``truth``."""
    if len(answers) != len(truth):
        raise ValueError(f"{len(answers)} answers for {len(truth)} questions")
    pos = [a for a, t in zip(answers, truth) if t == 1]
    neg = [a for a, t in zip(answers, truth) if t == 0]
    if not pos or not neg:
        raise ValueError("balanced accuracy needs both activating and non-activating examples")
    tpr = sum(pos) / len(pos)
    tnr = sum(1 - a for a in neg) / len(neg)
    acc = sum(int(a == t) for a, t in zip(answers, truth)) / len(truth)
    return {"balanced_accuracy": (tpr + tnr) / 2, "tpr": tpr, "tnr": tnr, "accuracy": acc}


def handle_detection_reply(outcome: Outcome, meta: dict[str, Any]) -> dict[str, Any]:
    truth = list(meta["truth"])
    base = {"latent": int(outcome.custom_id), "label": meta.get("label"), "model": meta.get("model")}
    try:
        ans = parse_detection(outcome.text, len(truth))
    except ParseError as e:
        why = str(e) + (" (the reply hit --max-output-tokens; raise it)" if outcome.stop_reason == "max_tokens" else "")
        return {**base, "status": "parse_error", "error": why, "raw": outcome.text}
    return {**base, "status": "ok", **balanced_accuracy(ans.answers, truth), "answers": ans.answers,
            "truth": truth, "docs": meta.get("docs"), "n_active": sum(truth), "n_random": len(truth) - sum(truth)}


def merge_scores(sae_dir: Path, results: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """Put ok detection results into latents.jsonl where the scored label is still the latent's label.
    Returns (written, stale)."""
    current = read_latents(sae_dir)
    written = stale = 0
    for r in results:
        latent = int(r["latent"])
        entry = current.get(latent)
        if entry is None or entry.get("label") != r.get("label"):
            stale += 1
            continue
        score = {k: r[k] for k in ("balanced_accuracy", "tpr", "tnr", "accuracy", "n_active", "n_random")}
        score["model"] = r.get("model")
        if entry.get("scores", {}).get("detection") != score:
            entry.setdefault("scores", {})["detection"] = score
            written += 1
    if written:
        write_latents(sae_dir, current)
    return written, stale


def summary_table(scores: Sequence[float], by_source: dict[str, list[float]]) -> Table:
    table = Table(title="detection scores (balanced accuracy; 0.5 = chance)")
    for col in ("labels", "n", "mean", "median", "p10", "p90", ">= 0.8", "<= 0.6"):
        table.add_column(col, justify="right" if col != "labels" else "left")

    def row(name: str, xs: Sequence[float]) -> None:
        xs = sorted(xs)
        q = lambda p: xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]  # noqa: E731
        table.add_row(name, f"{len(xs):,}", f"{statistics.fmean(xs):.3f}", f"{statistics.median(xs):.3f}",
                      f"{q(0.1):.3f}", f"{q(0.9):.3f}", f"{sum(x >= 0.8 for x in xs) / len(xs):.1%}",
                      f"{sum(x <= 0.6 for x in xs) / len(xs):.1%}")

    row("all", scores)
    if len(by_source) > 1:
        for name, xs in sorted(by_source.items()):
            row(name[:40], xs)
    return table


def plot_histogram(scores: Sequence[float], path: Path, title: str) -> Path:
    """A histogram PNG of balanced accuracies. Uses matplotlib's Agg canvas directly, so no global
    backend is switched (pyplot is never imported)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("the histogram needs matplotlib: pip install 'llama3-sae[plots]' "
                         "(or pass --no-plot)") from None
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(list(scores), bins=[i / 20 for i in range(21)], color="#4472c4", edgecolor="white")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_xlabel("balanced accuracy")
    ax.set_ylabel("latents")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def run_score(cfg: ScoreConfig, *, console: Console | None = None, client: Any = None) -> int:
    """Score the labels of the selected latents; returns the process exit code."""
    console = console or Console(stderr=True)
    meta = read_examples_meta(cfg.sae)
    latents = parse_latent_spec(cfg.latents, meta.get("n_latents"))
    labels = read_latents(cfg.sae)
    wanted = [lat for lat in (sorted(labels) if latents is None else latents)
              if labels.get(lat, {}).get("label")]
    if latents is not None and len(wanted) < len(latents):
        console.print(f"{len(latents) - len(wanted):,} selected latents have no label in latents.jsonl and are "
                      "not scored (run `llama3-sae interpret` first)")
    requests: list[Request] = []
    too_few: list[int] = []
    for rec in iter_examples(cfg.sae, wanted):
        label = labels[rec.latent]["label"]
        docs, truth = detection_items(rec, cfg.n_active, cfg.n_random, cfg.seed)
        if sum(truth) < cfg.min_examples or len(truth) - sum(truth) < cfg.min_examples:
            too_few.append(rec.latent)
            continue
        params = message_params(cfg.model, cfg.max_output_tokens, DETECTION_SYSTEM, detection_prompt(label, rec, docs),
                                cfg.thinking)
        requests.append(Request(str(rec.latent), params, {"latent": rec.latent, "label": label, "docs": docs,
                                                          "truth": truth, "model": cfg.model}))
    if too_few:
        console.print(f"{len(too_few):,} latents have fewer than {cfg.min_examples} held-out activating or random "
                      f"documents and are not scored (first: {too_few[:10]}); more text in top-examples helps")
    if not requests:
        console.print("no latents to score")
        return 0
    job = LLMJob(cfg, "score", "detection scoring", len(requests), console, client)
    runner = job.runner
    # A score measures one label: latents relabelled since their last score (or asked with a different
    # question) are asked again.
    by_id = {r.custom_id: r for r in requests}
    changed = []
    for cid, st in runner.statuses(by_id).items():
        meta = by_id[cid].meta
        if st.done and st.last and st.last.get("status") == "ok" and (
                st.last.get("label") != meta["label"] or st.last.get("truth") != meta["truth"]):
            changed.append(cid)
    if changed:
        runner.reset(changed, "label or question changed since the last score")
    summary = job.run(requests, handle_detection_reply)
    written, stale = merge_scores(cfg.sae, job.ok_records())
    if summary.aborted:
        return 1
    failures = job.finish(summary, requests)
    # The summary covers every current score in latents.jsonl, not just this run's.
    current = read_latents(cfg.sae)
    scores, by_source = [], {}
    for entry in current.values():
        det = entry.get("scores", {}).get("detection")
        if det:
            scores.append(float(det["balanced_accuracy"]))
            by_source.setdefault(str(entry.get("source", "?")), []).append(float(det["balanced_accuracy"]))
    console.print(f"{written:,} scores written to {cfg.sae / 'latents.jsonl'}"
                  + (f"; {stale:,} results skipped because their label has changed since" if stale else ""))
    if scores:
        Console().print(summary_table(scores, by_source))
        if cfg.plots:
            path = plot_histogram(scores, cfg.workdir / PLOT_FILE, f"detection scores of {len(scores):,} latents")
            console.print(f"histogram: {path}")
    return 0 if not failures else 3
