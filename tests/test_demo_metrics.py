"""The demo's measurements against values computed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from apps.demo_metrics import distinctive_words, mean_logprob, read_topics, topic_purity, topic_word_rate, words
from helpers import make_random_model, tiny_args


def _record(latent, top_docs, active_docs, max_act=2.0):
    return {"latent": latent, "stats": {"docs": 100, "tokens": 1000, "active_docs": active_docs,
                                         "active_tokens": active_docs, "max": max_act, "sum": 1.0},
            "top": {"max": [[d, 1.0] for d in top_docs], "mean": [], "last": []}, "quantiles": [],
            "score_active": [], "score_random": [], "docs": {}}


def test_topic_purity_counts_the_modal_topic_of_the_top_documents(tmp_path):
    topics = ["a"] * 30 + ["b"] * 30
    path = tmp_path / "top_examples.jsonl"
    recs = [_record(0, list(range(20)), 25),                      # all "a": purity 1
            _record(1, list(range(15)) + list(range(30, 35)), 40),  # 15 a + 5 b: 0.75
            _record(2, list(range(30, 50)), 10),                  # fired on too few documents: left out
            _record(3, list(range(5)), 30)]                       # fewer than 20 top documents: left out
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    got = topic_purity(path, topics, top=20, min_docs=20)
    assert [(p.latent, p.topic, p.purity) for p in got] == [(0, "a", 1.0), (1, "a", 0.75)]


def test_topic_word_rate():
    rate = topic_word_rate(["The Pawn takes the bishop.", "Nothing here at all", "pawn"], ["pawn", "bishop"])
    assert rate.n == 3
    assert rate.rate == pytest.approx(3 / (5 + 4 + 1)) and rate.share == pytest.approx(2 / 3)
    assert words("d'été 3.14 ça-va") == ["d", "été", "ça", "va"]


def test_distinctive_words_prefers_words_of_the_topic():
    texts = ["the pawn and the bishop", "a pawn moves", "the pawn wins", "the rain falls", "rain and wind today",
             "the rain again"]
    topics = ["chess"] * 3 + ["weather"] * 3
    got = distinctive_words(texts, topics, n=2, min_count=2)
    assert got["chess"][0] == "pawn" and got["weather"][0] == "rain" and "the" not in got["chess"]


def test_read_topics_skips_what_capture_skips(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a", "topic": "x"}\n\n{"text": "   ", "topic": "y"}\n{"text": "b"}\n')
    assert read_topics(path) == (["x", None], ["a", "b"])


def test_mean_logprob_matches_a_manual_computation():
    model = make_random_model(tiny_args(), seed=3)
    model.setup_cache(2, 64)
    prompts, outs = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    got = mean_logprob(model, prompts, outs)
    total, n = 0.0, 0
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            ids = torch.tensor([p + o])
            logp = torch.log_softmax(model(ids, 0)[0].float(), -1)
            for j, t in enumerate(o):
                total += float(logp[len(p) + j - 1, t])
                n += 1
    assert got == pytest.approx(total / n, rel=1e-5) and math.isfinite(got)
