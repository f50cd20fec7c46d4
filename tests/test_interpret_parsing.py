"""Reply parsing, prompts, latent specs, label merging and the heuristic labeller: no network, no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interpret.batch_client import JobRunner, RunnerOptions
from interpret.requests import Request, request_status
from interpret.cost import model_price
from interpret.labels import HEURISTIC_SOURCE, heuristic_labels, merge_labels
from interpret.parsing import ParseError, parse_certainty, parse_detection, parse_label, reply_text
from interpret.prompts import detection_items, detection_prompt, highlight, label_prompt, PromptOptions, strength
from interpret.records import (EXAMPLES_FILE, EXAMPLES_FORMAT, EXAMPLES_META, DocExample, LatentExamples,
                               parse_latent_spec, read_latents, write_latents)
from interpret.scoring import balanced_accuracy


# ---------------------------------------------------------------------- labels
@pytest.mark.parametrize("text, label, certainty", [
    ('<semantic_analysis>a {b} c</semantic_analysis>\n{"common_semantic": "UN bodies", "certainty": 0.85}',
     "UN bodies", 0.85),
    ('{"common_semantic": "integer certainty", "certainty": 1}', "integer certainty", 1.0),
    ('{"common_semantic": "zero", "certainty": 0}', "zero", 0.0),
    ('Here you go:\n```json\n{"common_semantic": "fenced", "certainty": 0.5}\n```\nLet me know!', "fenced", 0.5),
    ('{"common_semantic": "trailing", "certainty": 0.4} and some more words {not json', "trailing", 0.4),
    ('{"common_semantic": "string", "certainty": "0.7"}', "string", 0.7),
    ('{"common_semantic": "percent", "certainty": "70%"}', "percent", 0.7),
    ("{'common_semantic': 'python dict', 'certainty': 0.6}", "python dict", 0.6),
    ('{"common_semantic": "first", "certainty": 0.1}\nOn reflection:\n{"common_semantic": "second", '
     '"certainty": 0.9}', "second", 0.9),
    ('{"common_semantic": "braces {inside} the label", "certainty": 0.3}', "braces {inside} the label", 0.3),
    ('{"common_semantic": "  extra   spaces\\n here ", "certainty": 0.2}', "extra spaces here", 0.2),
])
def test_parse_label_accepts(text, label, certainty):
    ans = parse_label(text)
    assert ans.label == label and ans.certainty == pytest.approx(certainty) and not ans.warning


def test_parse_label_reasoning_and_raw_certainty():
    ans = parse_label('<semantic_analysis>\n1. key words\n</semantic_analysis>\n'
                      '{"common_semantic": "x", "certainty": 1}')
    assert ans.reasoning == "1. key words" and ans.certainty_raw == 1


@pytest.mark.parametrize("value, why", [(85, "outside"), (-0.1, "outside"), ("high", "not a number"),
                                        (True, "boolean"), (None, "type")])
def test_bad_certainty_keeps_the_label(value, why):
    ans = parse_label(json.dumps({"common_semantic": "kept", "certainty": value}))
    assert ans.label == "kept" and ans.certainty is None and why in ans.warning
    ans = parse_label('{"common_semantic": "no certainty"}')
    assert ans.certainty is None and "no \"certainty\"" in ans.warning


@pytest.mark.parametrize("text, why", [
    ("", "empty"), ("I could not find a pattern.", "no JSON object"),
    ('{"label": "wrong key", "certainty": 0.5}', "no JSON object"),
    ('<semantic_analysis>long thoughts</semantic_analysis>\n{"common_semantic": "cut off', "cut off"),
    ('{"common_semantic": "", "certainty": 0.5}', "non-empty"),
    ('{"common_semantic": 7, "certainty": 0.5}', "non-empty string"),
])
def test_parse_label_failures_say_why(text, why):
    with pytest.raises(ParseError, match=why):
        parse_label(text)


def test_parse_certainty_edges():
    assert parse_certainty(1) == 1.0 and parse_certainty("100%") == 1.0 and parse_certainty(" 0.25 ") == 0.25
    with pytest.raises(ParseError):
        parse_certainty(float("nan"))


def test_reply_text_ignores_thinking_blocks():
    assert reply_text([{"type": "thinking", "thinking": "{\"common_semantic\": \"no\"}"},
                       {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert reply_text(None) == ""


# ---------------------------------------------------------------------- detection
def test_parse_detection():
    assert parse_detection('<analysis>x</analysis>\n{"answers": [1, 0, true, false, "1", "no"]}', 6).answers == \
        [1, 0, 1, 0, 1, 0]
    assert parse_detection("The answer is [0, 1, 1].", 3).answers == [0, 1, 1]
    assert parse_detection('```json\n{"answers": [0, 1]}\n```\nthat is all', 2).answers == [0, 1]
    with pytest.raises(ParseError, match="2 entries for 3"):
        parse_detection('{"answers": [0, 1]}', 3)
    with pytest.raises(ParseError, match="expected 0 or 1"):
        parse_detection('{"answers": [0, 2]}', 2)
    with pytest.raises(ParseError, match="no JSON"):
        parse_detection("no idea", 2)


def test_balanced_accuracy():
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 0, 0])["balanced_accuracy"] == 1.0
    r = balanced_accuracy([1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0])  # "always fires": chance, however skewed
    assert r["balanced_accuracy"] == 0.5 and r["accuracy"] == pytest.approx(1 / 6)
    assert balanced_accuracy([1, 0, 1, 0], [1, 1, 0, 0])["balanced_accuracy"] == 0.5
    with pytest.raises(ValueError):
        balanced_accuracy([1], [1])


# ---------------------------------------------------------------------- prompts
def _rec(latent: int = 3) -> LatentExamples:
    docs = {10: DocExample(10, ["The", " United", " Nations", " met", "\n", "<<x>>"], [(1, 8.0), (2, 4.0), (4, 0.1)]),
            11: DocExample(11, ["A", " UN", " envoy"], [(1, 2.0)]),
            12: DocExample(12, ["Cats", " purr"], []), 13: DocExample(13, ["Dogs", " bark"], []),
            14: DocExample(14, ["Delegates", " voted"], [(0, 1.0)])}
    return LatentExamples(latent, {"docs": 1000, "tokens": 9000, "active_docs": 3, "active_tokens": 4,
                                   "max": 8.0, "sum": 15.1},
                          {"max": [(10, 8.0), (11, 2.0)], "mean": [(10, 2.4), (14, 0.5)], "last": []},
                          [{"lo": 1.0, "hi": 2.0, "examples": [(11, 2.0)]}],
                          [(14, 1.0)], [12, 13], docs)


def test_highlight_and_strength():
    rec = _rec()
    assert strength(8.0, 8.0) == 10 and strength(0.01, 8.0) == 1 and strength(0, 8.0) == 0
    text = highlight(rec.docs[10], 8.0)
    # Leading spaces outside the marks; line breaks visible; literal << >> not mistaken for marks.
    assert text == "The <<United>>(10) <<Nations>>(5) met<<⏎>>(1)‹‹x››"


def test_label_prompt_sections_and_no_repeats():
    user, shown = label_prompt(_rec(), PromptOptions(top=5, per_quantile=2))
    assert user.startswith("Latent 3. It fired on 3 of 1,000 documents (0.3%)")
    assert "strongest activation on a single token" in user and "highest average" in user
    assert "strongest at their last token" not in user  # empty section left out
    assert shown == [10, 11, 14]  # 11 (also in a quantile bin) and 10 (also in mean) shown once
    assert "across the activation range" not in user


def test_detection_items_are_seeded_and_hide_no_truth():
    rec = _rec()
    docs, truth = detection_items(rec, n_active=5, n_random=5, seed=0)
    assert sorted(zip(docs, truth)) == [(12, 0), (13, 0), (14, 1)]
    assert (docs, truth) == detection_items(rec, 5, 5, 0)
    prompt = detection_prompt("UN things", rec, docs)
    assert "<<" not in prompt and prompt.startswith("Description: UN things")
    assert prompt.count("\n") == 2 + len(docs)


def test_parse_latent_spec():
    assert parse_latent_spec("all") is None and parse_latent_spec(None) is None
    assert parse_latent_spec("0-3, 7,2") == [0, 1, 2, 3, 7]
    for bad, why in (("5-2", "backwards"), ("a", "cannot read"), ("1-", "cannot read")):
        with pytest.raises(ValueError, match=why):
            parse_latent_spec(bad)
    with pytest.raises(ValueError, match="past the SAE's 8 latents"):
        parse_latent_spec("0-9", n_latents=8)


# ---------------------------------------------------------------------- latents.jsonl
def _examples_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sae"
    d.mkdir()
    recs = [_rec(0), _rec(1), LatentExamples(2, {"active_docs": 0}, {"max": [], "mean": [], "last": []}, [], [], [])]
    (d / EXAMPLES_FILE).write_text("".join(json.dumps(r.to_json()) + "\n" for r in recs))
    (d / EXAMPLES_META).write_text(json.dumps({"format": EXAMPLES_FORMAT, "version": 1, "complete": True,
                                               "n_latents": 3}))
    return d


def test_heuristic_labels_and_merge_rules(tmp_path):
    d = _examples_dir(tmp_path)
    write_latents(d, {1: {"label": "from claude", "certainty": 0.9, "source": "claude-x",
                          "scores": {"detection": {"balanced_accuracy": 0.8}}}})
    counts = heuristic_labels(d)
    assert counts == {"labelled": 1, "dead": 1, "kept_llm": 1}
    lat = read_latents(d)
    assert lat[0]["label"] == "fires on 'United', 'Nations', 'UN'" and lat[0]["source"] == HEURISTIC_SOURCE
    assert 0 < lat[0]["certainty"] <= 1
    assert lat[1]["label"] == "from claude" and lat[1]["scores"]["detection"]["balanced_accuracy"] == 0.8
    assert 2 not in lat
    # A new label drops the scores of the old one; the same label keeps them.
    merge_labels(d, [{"latent": 1, "status": "ok", "label": "from claude", "certainty": 0.7}], "claude-x")
    assert read_latents(d)[1]["scores"]["detection"]["balanced_accuracy"] == 0.8
    merge_labels(d, [{"latent": 1, "status": "ok", "label": "new", "certainty": 0.7}], "claude-x")
    assert read_latents(d)[1]["scores"] == {}
    heuristic_labels(d, overwrite_llm_labels=True)
    assert read_latents(d)[1]["source"] == HEURISTIC_SOURCE
    assert [json.loads(x)["latent"] for x in (d / "latents.jsonl").read_text().splitlines()] == [0, 1]


# ---------------------------------------------------------------------- runner bookkeeping
def test_request_status_rules():
    ok = {"status": "ok", "final": True}
    exp = {"status": "expired", "final": False}
    fail = {"status": "parse_error", "final": True}
    assert request_status([], False).done is False
    assert request_status([exp, ok], False).done
    assert request_status([exp, exp], False).attempts == 2
    assert request_status([exp, fail], False).done and not request_status([exp, fail], True).done
    assert request_status([exp, fail, exp], True).attempts == 1
    assert not request_status([ok, {"status": "reset"}], False).done  # a reset makes it pending again


def test_chunks_respect_count_and_size(tmp_path):
    runner = JobRunner(client=None, workdir=tmp_path, kind="labels",
                       options=RunnerOptions(max_requests_per_batch=3, max_batch_mb=0.01))
    reqs = [Request(str(i), {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 3200}]})
            for i in range(7)]
    chunks = runner.chunks(reqs)
    assert [r.custom_id for c in chunks for r in c] == [str(i) for i in range(7)]
    assert all(len(c) <= 3 and sum(r.json_bytes() for r in c) <= 0.01 * 2**20 for c in chunks)
    assert len(chunks) == 4  # two per batch: three 3.2 KB requests exceed 10 KiB minus the envelope
    big = Request("x", {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 20000}]})
    with pytest.raises(ValueError, match="alone is"):
        runner.chunks([big])


def test_prices():
    price, note = model_price("claude-sonnet-5-5", True, None, None)
    assert price == (1.0, 5.0) and "batch" in note
    assert model_price("claude-sonnet-5-5", False, 3.0, None)[0] == (3.0, 10.0)
    assert model_price("mystery", True, None, None)[0] is None
