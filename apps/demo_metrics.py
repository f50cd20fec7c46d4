"""What the demo measures: topic purity of latents, topic words in completions, fluency.

Pure functions over files the pipeline wrote (the corpus, ``top_examples.jsonl``) and token lists, so they
can be checked against hand-computed values.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-case letter runs of ``text`` (digits and punctuation split words)."""
    return [w.lower() for w in _WORD.findall(text)]


def read_topics(path: Path, field: str = "topic", text_field: str = "text", limit: int | None = None
                ) -> tuple[list[str | None], list[str]]:
    """Per document (the order capture reads a .jsonl in) its topic (None when the line has none) and text."""
    topics: list[str | None] = []
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not str(row.get(text_field, "")).strip():
                continue  # capture skips these too: no document, no doc id
            topic = row.get(field)
            topics.append(str(topic) if topic is not None else None)
            texts.append(str(row[text_field]))
            if limit is not None and len(topics) >= limit:
                break
    return topics, texts


def distinctive_words(texts: Sequence[str], topics: Sequence[str | None], n: int = 40, min_count: int = 3
                      ) -> dict[str, list[str]]:
    """For corpora without a word list: per topic, the words most over-represented in its documents
    (smoothed log-odds against the rest of the corpus), seen in at least ``min_count`` of them."""
    doc_freq: dict[str, Counter] = {}
    overall: Counter = Counter()
    for text, topic in zip(texts, topics):
        if topic is None:
            continue
        seen = set(words(text))
        doc_freq.setdefault(topic, Counter()).update(seen)
        overall.update(seen)
    sizes = Counter(t for t in topics if t is not None)
    total = sum(sizes.values())
    out = {}
    for topic, counts in doc_freq.items():
        rest = total - sizes[topic]

        def score(w: str) -> float:
            inside = (counts[w] + 0.5) / (sizes[topic] + 1)
            outside = (overall[w] - counts[w] + 0.5) / (rest + 1)
            return math.log(inside / outside)

        cands = [w for w, c in counts.items() if c >= min_count and len(w) > 2 and score(w) > 0.5]
        out[topic] = sorted(cands, key=lambda w: (-score(w), w))[:n]
    return out


@dataclass
class LatentPurity:
    latent: int
    topic: str
    purity: float
    """Share of the latent's top documents (by max activation) in its most common topic."""
    active_docs: int
    max_act: float
    top_docs: list[int]


def topic_purity(examples_path: Path, topics: Sequence[str | None], *, top: int = 20, min_docs: int = 20
                 ) -> list[LatentPurity]:
    """Purity of every latent that fired on at least ``min_docs`` documents, purest first."""
    out = []
    with open(examples_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            stats = rec["stats"]
            ranked = [int(d) for d, _ in rec["top"]["max"]][:top]
            if stats["active_docs"] < min_docs or len(ranked) < top:
                continue
            named = [topics[d] for d in ranked if d < len(topics) and topics[d] is not None]
            if not named:
                continue
            topic, count = Counter(named).most_common(1)[0]
            out.append(LatentPurity(int(rec["latent"]), topic, count / top, int(stats["active_docs"]),
                                    float(stats["max"]), ranked))
    out.sort(key=lambda p: (-p.purity, -p.active_docs, p.latent))
    return out


@dataclass
class WordRate:
    rate: float
    """Topic words per word of the completions."""
    share: float
    """Share of completions holding at least one topic word."""
    n: int


def topic_word_rate(texts: Iterable[str], topic_words: Iterable[str]) -> WordRate:
    vocab = {w.lower() for w in topic_words}
    hits = total = holding = n = 0
    for text in texts:
        ws = words(text)
        found = sum(w in vocab for w in ws)
        hits, total, holding, n = hits + found, total + len(ws), holding + (found > 0), n + 1
    return WordRate(hits / max(total, 1), holding / max(n, 1), n)


@torch.inference_mode()
def mean_logprob(model, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> float:
    """Mean log-probability per generated token under ``model`` as it is (no hooks): the fluency measure.

    Rows are right-padded into one batch; causal attention keeps padding out of every real position."""
    rows = [list(p) + list(o) for p, o in zip(prompts, outputs) if o]
    if not rows:
        return float("nan")
    T = max(len(r) for r in rows)
    device = model.tok_embeddings.weight.device
    tokens = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    logp = torch.log_softmax(model(tokens, 0).float(), dim=-1)
    total, count = 0.0, 0
    for i, (p, o) in enumerate((p, o) for p, o in zip(prompts, outputs) if o):
        start = len(p)
        idx = torch.arange(start, start + len(o), device=device)
        total += float(logp[i, idx - 1, tokens[i, idx]].sum())
        count += len(o)
    return total / count
