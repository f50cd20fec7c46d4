"""Prompts for labelling a latent and for detection scoring a label.

The labelling prompt keeps the original project's recipe (reasoning inside ``<semantic_analysis>``:
key words, thematic groups, outliers; then a JSON object with ``common_semantic`` and ``certainty``)
and adds what it lacked: the tokens where the latent fired are marked ``<<like this>>`` with their
strength on a 0-10 scale, examples are grouped by how they were chosen (strongest single token, highest
average, strongest at the last token), and a sample from across the activation range shows what the
weak activations look like, so a label is not fit to the top examples alone.

The detection prompt shows a label and a shuffled, unmarked mix of documents on which the latent fires
and documents on which it does not, and asks which fire (EleutherAI's and Goodfire's detection score).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .records import DocExample, LatentExamples

BOS = "<|begin_of_text|>"

LABEL_SYSTEM = """\
You interpret latents of a sparse autoencoder trained on a language model's internal activations. A \
latent responds to some pattern in text: a topic, a word or name, a grammatical role, a format, or \
what is likely to come next. You will see documents on which one latent fired. Tokens where it fired are \
marked <<like this>>, each followed by its strength from 1 to 10 (10 = the latent's strongest activation \
anywhere); unmarked tokens had zero activation.

First reason inside <semantic_analysis> tags:
1. Key words: list the marked tokens and short phrases, especially the strongest, and what surrounds them.
2. Thematic grouping: group the examples by what they share (meaning, topic, grammatical role, format, \
position). Say which single description explains the most examples, weighting strong activations more.
3. Outliers: name the examples that do not fit, and whether the weaker examples follow the same pattern \
or a broader one.

Then, after </semantic_analysis>, write one JSON object and nothing after it:
{"common_semantic": "<what the latent detects, at most 20 words>", "certainty": <a number from 0 to 1>}

Write the description as the pattern itself (e.g. "References to United Nations bodies, staff or \
documents"), not as "this latent fires on ...". Certainty is how well the description covers the \
examples: near 1 when nearly all fit, near 0 when you found no common pattern (say so in the description)."""

DETECTION_SYSTEM = """\
You check whether a description of a sparse-autoencoder latent predicts where the latent fires. You get \
the description and numbered documents. Some are documents on which the latent fires (somewhere in the \
document); the others are random documents on which it does not fire at all. Judging only by the \
description, decide for each document whether the latent fires on it.

Think briefly inside <analysis> tags, then write one JSON object and nothing after it:
{"answers": [one entry per document, in order: 1 if the latent fires on it, 0 if not]}"""


@dataclass
class PromptOptions:
    top: int = 12
    """Examples per aggregation section (strongest token / highest mean / strongest last token)."""
    per_quantile: int = 2
    """Examples per activation-range bin."""


def _clean(piece: str) -> str:
    # One example per line in the prompt: show line breaks and tabs as visible marks instead of breaking
    # the list; keep literal << >> from looking like our markers.
    return (piece.replace("\r\n", "\n").replace("\n", "⏎").replace("\t", " ")
            .replace("<<", "‹‹").replace(">>", "››"))


def strength(value: float, latent_max: float) -> int:
    """Activation on a 1-10 scale relative to the latent's maximum (any firing shows as at least 1)."""
    if value <= 0:
        return 0
    if latent_max <= 0:
        return 10
    return max(1, min(10, round(10 * value / latent_max)))


def highlight(example: DocExample, latent_max: float) -> str:
    """The document with each firing token as ``<<token>>(s)``; leading spaces stay outside the marks."""
    fired = {p: v for p, v in example.acts}
    out = []
    for pos, piece in enumerate(example.tokens):
        if pos == 0 and piece == BOS and pos not in fired:
            continue  # a leading <|begin_of_text|> is never credited (see top-examples); it is only noise here
        text = _clean(piece)
        if pos in fired and text.strip():
            stripped = text.lstrip(" ")
            lead = text[: len(text) - len(stripped)]
            out.append(f"{lead}<<{stripped}>>({strength(fired[pos], latent_max)})")
        elif pos in fired:
            # A whitespace-only or partial-character token that fired: mark it visibly all the same.
            out.append(f"<<{text or '∅'}>>({strength(fired[pos], latent_max)})")
        else:
            out.append(text)
    return "".join(out).strip()


def label_prompt(rec: LatentExamples, opts: PromptOptions) -> tuple[str, list[int]]:
    """The user message for labelling ``rec``'s latent, and the documents it shows (in order)."""
    stats = rec.stats
    latent_max = float(stats.get("max", 0.0)) or max((e.max_act for e in rec.docs.values()), default=0.0)
    lines = [f"Latent {rec.latent}."]
    docs_total, active = int(stats.get("docs", 0)), int(stats.get("active_docs", 0))
    if docs_total:
        lines[0] += (f" It fired on {active:,} of {docs_total:,} documents ({100 * active / docs_total:.3g}%); "
                     f"its strongest activation was {latent_max:.3g}.")
    shown: list[int] = []
    sections = (("max", "Documents with the strongest activation on a single token"),
                ("mean", "Documents with the highest average activation over all their tokens (not shown above)"),
                ("last", "Documents with the strongest activation at their last token (not shown above)"))
    for agg, title in sections:
        picks = [d for d, _ in rec.top.get(agg, []) if d not in shown and d in rec.docs][: opts.top]
        if not picks:
            continue
        lines += ["", f"## {title}"]
        for d in picks:
            shown.append(d)
            lines.append(f"{len(shown)}. {highlight(rec.docs[d], latent_max)}")
    # The range sample: only documents not shown above, and no header when nothing is left.
    picks_by_bin = []
    taken = set(shown)
    for q in rec.quantiles if opts.per_quantile > 0 else ():
        picks = [d for d, _ in q["examples"] if d not in taken and d in rec.docs][: opts.per_quantile]
        taken.update(picks)
        picks_by_bin.append(picks)
    if any(picks_by_bin):
        lines += ["", "## A sample from across the activation range, weakest first"]
        for picks in picks_by_bin:
            for d in picks:
                shown.append(d)
                lines.append(f"{len(shown)}. (max strength {strength(rec.docs[d].max_act, latent_max)}) "
                             f"{highlight(rec.docs[d], latent_max)}")
    return "\n".join(lines), shown


def detection_items(rec: LatentExamples, n_active: int, n_random: int, seed: int
                    ) -> tuple[list[int], list[int]]:
    """The scoring documents (doc ids, shuffled) and their truth (1 = the latent fires)."""
    active = [d for d, _ in rec.score_active if d in rec.docs][:n_active]
    random_docs = [d for d in rec.score_random if d in rec.docs][:n_random]
    items = [(d, 1) for d in active] + [(d, 0) for d in random_docs]
    # Seeded per latent, so a rerun builds the same question (the shuffle is also saved with the request).
    random.Random(seed * 1_000_003 + rec.latent).shuffle(items)
    return [d for d, _ in items], [t for _, t in items]


def detection_prompt(label: str, rec: LatentExamples, docs: list[int]) -> str:
    lines = [f"Description: {label}", "", "Documents:"]
    for i, d in enumerate(docs, 1):
        lines.append(f"{i}. {_clean(rec.docs[d].text).strip()}")
    return "\n".join(lines)


def message_params(model: str, max_tokens: int, system: str, user: str, thinking: str) -> dict[str, Any]:
    """Keyword arguments of ``messages.create`` for one request."""
    params: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "system": system,
                              "messages": [{"role": "user", "content": user}]}
    if thinking != "model-default":
        params["thinking"] = {"type": thinking}
    return params
