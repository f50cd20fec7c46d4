"""A latent's page, as Neuronpedia shows a feature: its label, certainty and scores, how often it fires,
its top examples and samples from each activation quantile with every token shaded by the activation,
and the output tokens its decoder direction promotes and suppresses. Built from the files beside the SAE
(``top_examples.jsonl``, ``latents.jsonl``) and the model's unembedding; rendered as HTML for the web app
and with Rich for ``llama3-sae latent``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from interpret.records import DocExample, LatentExamples

from .latents import LatentCatalog, LatentInfo

WINDOW_BEFORE, WINDOW_AFTER = 24, 16
"""Tokens shown before and after an example's strongest token (longer documents are cut with an ellipsis)."""


# --------------------------------------------------------------------------- the data
@dataclass
class OutputTokens:
    """Tokens whose logits the latent's decoder direction raises (``positive``) and lowers (``negative``)
    most: the direction through the final norm's weight and the unembedding, as (token text, logit)."""

    positive: list[tuple[str, float]]
    negative: list[tuple[str, float]]


def decoder_logits(sae: Any, model: Any, latent: int) -> torch.Tensor:
    """[vocab] W_dec[latent] (the direction the latent writes at its site) scaled by the final RMSNorm's
    weight and projected on the unembedding: each token's logit change per unit of the direction, up to
    the norm's 1/rms."""
    with torch.no_grad():
        direction = sae.W_dec[latent].float().to(model.output.weight.device)
        return (model.output.weight.float() @ (direction * model.norm.weight.float())).cpu()


def output_tokens(sae: Any, model: Any, tokenizer: Any, latent: int, k: int = 10) -> OutputTokens:
    """The tokens ``decoder_logits`` raises and lowers most (negative logits: the tokens it suppresses)."""
    logits = decoder_logits(sae, model, latent)
    with torch.no_grad():
        k = min(k, logits.numel())
        up, down = logits.topk(k), (-logits).topk(k)
    decode = lambda ids, vals: [(tokenizer.decode([int(i)]), float(v)) for i, v in zip(ids, vals)]  # noqa: E731
    return OutputTokens(decode(up.indices.tolist(), up.values.tolist()),
                        decode(down.indices.tolist(), (-down.values).tolist()))


@dataclass
class LatentPage:
    latent: int
    info: LatentInfo
    record: dict[str, Any] = field(default_factory=dict)
    """The latent's line of latents.jsonl (label, certainty, scores, reasoning), {} when unlabelled."""
    examples: LatentExamples | None = None
    """Its record of top_examples.jsonl; None when top-examples was not run."""
    outputs: OutputTokens | None = None
    """None when no model was given."""

    @property
    def stats(self) -> dict[str, Any]:
        return self.examples.stats if self.examples is not None else {}

    @property
    def token_density(self) -> float | None:
        """Share of the scanned tokens the latent fired on."""
        tokens = self.stats.get("tokens")
        return self.stats.get("active_tokens", 0) / tokens if tokens else None

    @property
    def doc_density(self) -> float | None:
        docs = self.stats.get("docs")
        return self.stats.get("active_docs", 0) / docs if docs else None

    @property
    def scores(self) -> dict[str, Any]:
        return dict(self.record.get("scores") or {})

    def top_examples(self, n: int = 10) -> list[DocExample]:
        """The documents with the largest activation (by max over tokens), strongest first."""
        if self.examples is None:
            return []
        return [self.examples.docs[d] for d, _ in self.examples.top.get("max", [])[:n] if d in self.examples.docs]

    def quantile_samples(self, per_bin: int = 2) -> list[tuple[float, float, list[DocExample]]]:
        """(lo, hi, documents) of each activation quantile bin, strongest bin first."""
        if self.examples is None:
            return []
        out = []
        for q in reversed(self.examples.quantiles):
            docs = [self.examples.docs[d] for d, _ in q["examples"][:per_bin] if d in self.examples.docs]
            if docs:
                out.append((q["lo"], q["hi"], docs))
        return out


def build_page(latent: int, catalog: LatentCatalog, *, sae: Any = None, model: Any = None,
               tokenizer: Any = None, n_output_tokens: int = 10) -> LatentPage:
    """The page of ``latent`` from ``catalog`` (labels and the examples file) and, when given, the model's
    unembedding for its output tokens."""
    info = catalog.info(latent)
    outputs = None
    if sae is not None and model is not None and tokenizer is not None:
        outputs = output_tokens(sae, model, tokenizer, latent, n_output_tokens)
    return LatentPage(latent, info, dict(catalog.labels.get(latent, {})), catalog.examples(latent), outputs)


def window(doc: DocExample) -> tuple[int, int]:
    """[start, end) of the tokens shown for an example: around its strongest token."""
    peak = max(doc.acts, key=lambda pv: pv[1])[0] if doc.acts else 0
    return max(0, peak - WINDOW_BEFORE), min(len(doc.tokens), peak + WINDOW_AFTER + 1)


def _describe_scores(scores: dict[str, Any]) -> str:
    parts = []
    for name, s in sorted(scores.items()):
        if isinstance(s, dict):
            main = next((s[k] for k in ("balanced_accuracy", "accuracy", "f1", "score") if k in s), None)
            parts.append(f"{name} {main:.2f}" if isinstance(main, (int, float)) else name)
        elif isinstance(s, (int, float)):
            parts.append(f"{name} {s:.2f}")
    return ", ".join(parts)


def _meta(page: LatentPage) -> list[str]:
    """The page's line under the title: certainty, label source, scores, density."""
    info, out = page.info, []
    if info.certainty is not None:
        out.append(f"certainty {info.certainty:.2f}")
    if info.source:
        out.append(f"label from {info.source}")
    scores = _describe_scores(page.scores)
    if scores:
        out.append(f"scores: {scores}")
    return out + [_density_text(page)]


def _density_text(page: LatentPage) -> str:
    st = page.stats
    if not st:
        return "no top examples (run `llama3-sae top-examples --sae SAE_DIR`)"
    if page.examples is not None and page.examples.is_dead:
        return f"never fired over {st.get('tokens', 0):,} tokens of {st.get('docs', 0):,} documents (dead)"
    mean = st.get("sum", 0.0) / max(st.get("active_tokens", 0), 1)
    return (f"fires on {page.token_density:.3%} of tokens ({st['active_tokens']:,} of {st['tokens']:,}) and in "
            f"{page.doc_density:.2%} of documents; max {st.get('max', 0.0):.3g}, mean when active {mean:.3g}")


# --------------------------------------------------------------------------- HTML
def shade(value: float, peak: float) -> float:
    """Opacity of a token's highlight: its activation relative to ``peak`` (0 for zero or negative)."""
    return 0.0 if peak <= 0 or value <= 0 else min(1.0, value / peak)


def tokens_html(tokens: Sequence[str], values: Sequence[float], peak: float, *, marks: Sequence[bool] = (),
                start: int = 0, end: int | None = None) -> str:
    """Tokens as spans shaded by ``values`` (one per token) relative to ``peak``, each with its value as a
    tooltip; ``marks[i]`` outlines token i (a difference between steered and unsteered text)."""
    end = len(tokens) if end is None else end
    out = ["…" if start > 0 else ""]
    for i in range(start, end):
        v = float(values[i]) if i < len(values) else 0.0
        alpha = shade(v, peak)
        style = f"background: rgba(255, 140, 0, {0.85 * alpha:.3f});" if alpha > 0 else ""
        cls = ' class="diff"' if i < len(marks) and marks[i] else ""
        out.append(f'<span{cls} style="{style}" title="{v:.3f}">{html.escape(tokens[i])}</span>')
    out.append("…" if end < len(tokens) else "")
    return "".join(out)


def dense_values(doc: DocExample) -> list[float]:
    """The latent's activation at every token of an example (0 where it did not fire)."""
    values = [0.0] * len(doc.tokens)
    for p, v in doc.acts:
        if p < len(values):
            values[p] = v
    return values


def page_peak(page: LatentPage, top_n: int) -> float:
    """The activation that gets the darkest shade: the latent's largest over the pass."""
    return float(page.stats.get("max") or 0.0) or max((d.max_act for d in page.top_examples(top_n)), default=1.0)


def _doc_html(doc: DocExample, peak: float) -> str:
    values = dense_values(doc)
    start, end = window(doc)
    return (f'<div class="example" data-doc="{doc.doc}"><span class="act">{doc.max_act:.2f}</span> '
            f"{tokens_html(doc.tokens, values, peak, start=start, end=end)}</div>")


PAGE_CSS = """
.latent-page .example { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 2px 0;
  padding: 2px 4px; border-bottom: 1px solid rgba(128,128,128,.2); }
.latent-page .act { display: inline-block; min-width: 3.5em; color: #888; }
.latent-page .out span { font-family: ui-monospace, monospace; margin-right: .6em; }
.diff { outline: 1px dashed #c0392b; }
"""


def page_html(page: LatentPage, *, top_n: int = 10, per_bin: int = 2) -> str:
    info = page.info
    peak = page_peak(page, top_n)
    head = [f'<div class="latent-page" data-latent="{page.latent}"><h3>Latent {page.latent} · '
            f"{html.escape(info.label)}</h3><p>{html.escape(' · '.join(_meta(page)))}</p>"]
    reasoning = page.record.get("reasoning")
    if reasoning:
        head.append(f"<details><summary>labeller's reasoning</summary>{html.escape(str(reasoning))}</details>")
    parts = ["".join(head)]
    if page.outputs is not None:
        fmt = lambda xs: " ".join(f"<span>{html.escape(repr(t))} {v:+.2f}</span>" for t, v in xs)  # noqa: E731
        parts.append(f'<p class="out"><b>promotes</b> {fmt(page.outputs.positive)}</p>'
                     f'<p class="out"><b>suppresses</b> {fmt(page.outputs.negative)}</p>')
    top = page.top_examples(top_n)
    if top:
        parts.append("<h4>Top examples</h4>" + "".join(_doc_html(d, peak) for d in top))
    bins = page.quantile_samples(per_bin)
    if bins:
        parts.append("<h4>Samples by activation quantile (strongest first)</h4>")
        for lo, hi, docs in bins:
            parts.append(f"<p>activation {lo:.2f} – {hi:.2f}</p>" + "".join(_doc_html(d, peak) for d in docs))
    parts.append("</div>")
    return "".join(parts)


# --------------------------------------------------------------------------- Rich
def _tokens_text(tokens: Sequence[str], values: Sequence[float], peak: float, start: int, end: int) -> Text:
    text = Text("…" if start > 0 else "")
    for i in range(start, end):
        alpha = shade(float(values[i]) if i < len(values) else 0.0, peak)
        # Five steps of orange: terminals cannot blend, so the shade is binned.
        level = min(4, int(alpha * 5)) if alpha > 0 else -1
        style = ["", "on rgb(90,50,0)", "on rgb(140,75,0)", "on rgb(190,100,0)", "on rgb(235,125,0)",
                 "bold black on rgb(255,150,0)"][level + 1]
        text.append(tokens[i].replace("\n", "⏎"), style=style)
    if end < len(tokens):
        text.append("…")
    return text


def _doc_text(doc: DocExample, peak: float) -> Text:
    values = dense_values(doc)
    start, end = window(doc)
    line = Text(f"{doc.max_act:6.2f}  ", style="dim")
    line.append_text(_tokens_text(doc.tokens, values, peak, start, end))
    return line


def page_rich(page: LatentPage, *, top_n: int = 10, per_bin: int = 2) -> Group:
    info = page.info
    peak = page_peak(page, top_n)
    parts: list[Any] = [Text(f"Latent {page.latent} · {info.label}", style="bold"),
                        Text(" · ".join(_meta(page)), style="dim")]
    if page.outputs is not None:
        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("promotes")
        table.add_column("logit", justify="right")
        table.add_column("suppresses")
        table.add_column("logit", justify="right")
        for (t1, v1), (t2, v2) in zip(page.outputs.positive, page.outputs.negative):
            table.add_row(repr(t1), f"{v1:+.2f}", repr(t2), f"{v2:+.2f}")
        parts += [Text(""), table]
    top = page.top_examples(top_n)
    if top:
        parts += [Text(""), Text("Top examples", style="bold")] + [_doc_text(d, peak) for d in top]
    for lo, hi, docs in page.quantile_samples(per_bin):
        parts += [Text(f"activation {lo:.2f} – {hi:.2f}", style="bold")] + [_doc_text(d, peak) for d in docs]
    return Group(*parts)


def page_json(page: LatentPage, *, top_n: int = 10) -> dict[str, Any]:
    """The page's data as JSON (``llama3-sae latent --json``)."""
    return {"latent": page.latent, "label": page.info.label, "certainty": page.info.certainty,
            "source": page.info.source, "scores": page.scores, "stats": page.stats,
            "token_density": page.token_density, "doc_density": page.doc_density,
            "top_examples": [{"doc": d.doc, "text": d.text, "max": d.max_act, "acts": d.acts}
                             for d in page.top_examples(top_n)],
            "output_tokens": None if page.outputs is None else
            {"positive": page.outputs.positive, "negative": page.outputs.negative}}
