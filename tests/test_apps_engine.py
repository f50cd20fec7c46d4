"""The apps' engine (model + SAE + steering + latent readings), the latent catalog and attribution,
checked against independent computations on a tiny model."""

from __future__ import annotations

import json
from html import escape

import pytest
import torch

pytest.importorskip("llama_models")

from apps_support import N_LATENTS, SITE, build_env  # noqa: E402

from apps.attribution import attribute  # noqa: E402
from apps.engine import Engine, ModelOptions, Sampling, apply_edits  # noqa: E402
from apps.latents import UNLABELLED, LatentCatalog, read_max_activations  # noqa: E402
from sae import Edit, SAEConfig, SparseAutoencoder, load_sae, steer_fn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The delegates gathered at the", "Hello"]
GREEDY = Sampling(temperature=0.0, top_p=0.9, seed=None, max_new_tokens=6)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.getbasetemp() / "apps-env")


@pytest.fixture(scope="module")
def engine(env):
    return Engine.load(ModelOptions(ckpt_dir=env.ckpt, max_seq_len=64, device="cpu", model_dtype="fp32"), env.sae,
                       max_batch_size=4)


def _run(engine, prompts, sampling, edits=(), top=5):
    steps = list(engine.stream(engine.encode_prompts(prompts), sampling, edits, top_latents=top))
    return steps, steps[-1].completions


def _site_acts(engine, ids: list[int]) -> torch.Tensor:
    """The SAE site's activations [T, d] of ``ids``, from a plain forward without the KV cache."""
    model = engine.llm.model
    model.set_hooks([SITE], None)
    try:
        acts = model.forward_activations(torch.tensor([ids]))[SITE][0]
    finally:
        model.set_hooks(None, None)
    return acts.float()


def test_stream_matches_the_model_and_reads_the_latest_token(engine):
    steps, completions = _run(engine, PROMPTS, GREEDY)
    ref = engine.llm.text_completion(PROMPTS, temperature=0.0, max_gen_len=6)
    assert [c.text for c in completions] == [r.text for r in ref]
    texts = ["", ""]
    for s in steps:
        texts = [t + d for t, d in zip(texts, s.deltas)]
    assert texts == [r.text for r in ref]
    # Every reading is the SAE's code at the token the model just processed: replay the whole sequence
    # without the cache and compare position by position.
    tok = engine.llm.tokenizer
    for row, c in enumerate(completions):
        full = c.prompt_tokens + c.tokens
        h = engine.sae.encode(_site_acts(engine, full))  # [T, n_latents]
        pos = min(len(x.prompt_tokens) for x in completions) - 1
        checked = 0
        for s in steps:
            if s.token[row] is not None:
                assert s.token[row] == tok.decode([full[pos]])
                vals, idx = h[pos].topk(5)
                got = s.latents[row]
                assert [i for i, _ in got] == [int(i) for i, v in zip(idx, vals) if v > 0]
                assert [v for _, v in got] == pytest.approx([float(v) for v in vals if v > 0], abs=1e-4)
                checked += 1
            pos += 1
        assert checked >= len(c.tokens) - 1
    # The output latents: the largest value of each latent over the positions that produced the output.
    last = steps[-1].output_latents
    for row, c in enumerate(completions):
        full = c.prompt_tokens + c.tokens
        h = engine.sae.encode(_site_acts(engine, full))
        span = h[len(c.prompt_tokens) - 1: len(full) - 1].max(0).values
        vals, idx = span.topk(5)
        assert [i for i, _ in last[row]] == idx.tolist()
        assert [v for _, v in last[row]] == pytest.approx(vals.tolist(), abs=1e-4)


def test_steering_is_per_call_and_equals_the_hooked_model(engine):
    edit = Edit(3, "add", 40.0)
    _, base = _run(engine, PROMPTS, GREEDY, top=0)
    steps, steered = _run(engine, PROMPTS, GREEDY, [edit])
    assert [c.text for c in steered] != [c.text for c in base]
    # The same as setting the SAE hook by hand on the model.
    model = engine.llm.model
    model.set_hooks(None, {SITE: steer_fn(engine.sae, [edit])})
    try:
        ref = engine.llm.text_completion(PROMPTS, temperature=0.0, max_gen_len=6)
    finally:
        model.set_hooks(None, None)
    assert [c.text for c in steered] == [r.text for r in ref]
    # Nothing is left behind: the next unsteered call is the unsteered output again.
    _, again = _run(engine, PROMPTS, GREEDY, top=0)
    assert [c.text for c in again] == [c.text for c in base]
    assert model.sae_fns == {} and model.store_sites == ()
    # The panel shows the steered latent with its edited value (h + 40 dominates).
    for s in steps:
        for row in range(2):
            if s.token[row] is not None:
                assert s.latents[row][0][0] == 3 and s.latents[row][0][1] >= 40.0


def test_sampled_rows_are_reproducible_with_a_seed(engine):
    sampling = Sampling(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=5)
    _, a = _run(engine, PROMPTS, sampling)
    _, b = _run(engine, PROMPTS, sampling)
    assert [c.tokens for c in a] == [c.tokens for c in b]


def test_apply_edits_matches_the_edit_semantics():
    h = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 5.0]])
    out = apply_edits(h.clone(), [Edit(0, "add", 1.5), Edit(1, "set", 7.0, rows=(1,)), Edit(2, "zero"),
                                  Edit(0, "clamp", max=2.0)])
    assert out.tolist() == [[2.0, 2.0, 0.0], [2.0, 7.0, 0.0]]


def test_input_errors_are_clear(engine, env):
    with pytest.raises(ValueError, match=r"latent 64 is out of range: this SAE has latents 0\.\.63"):
        engine.parse_edits(["64=1"])
    with pytest.raises(ValueError, match="--steer 'The cat': cannot parse steering edit"):
        engine.parse_edits(["The cat"])
    with pytest.raises(ValueError, match=r"prompt 2 has \d+ tokens.*context of 64 tokens.*--max-seq-len"):
        engine.encode_prompts(["ok", "word " * 80])
    with pytest.raises(ValueError, match="5 prompts.*at most 4"):
        engine.encode_prompts(["a"] * 5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.encode_prompts(["  ", "x"])
    with pytest.raises(ValueError, match="no room for a reply"):
        engine.encode_dialog([{"role": "user", "content": "word " * 80}])


def test_an_sae_that_does_not_fit_is_refused_before_the_model_loads(env, tmp_path):
    wide = SparseAutoencoder(SAEConfig(d_model=128, n_latents=16, k=2, site=SITE), seed=0)
    wide.save(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"does not fit the model.*d_model=128.*width is 64"):
        Engine.load(ModelOptions(ckpt_dir=env.ckpt, device="cpu", model_dtype="fp32"), tmp_path / "wide")
    deep = SparseAutoencoder(SAEConfig(d_model=64, n_latents=16, k=2, site="L9R"), seed=0)
    deep.save(tmp_path / "deep")
    with pytest.raises(ValueError, match=r"L9R is past the model's last layer \(3\)"):
        Engine.load(ModelOptions(ckpt_dir=env.ckpt, device="cpu", model_dtype="fp32"), tmp_path / "deep")
    with pytest.raises(FileNotFoundError, match="no such file"):
        Engine.load(ModelOptions(ckpt_dir=env.ckpt, device="cpu", model_dtype="fp32"), tmp_path / "missing")


def test_catalog_reads_labels_and_ranges(env):
    from interpret import iter_examples

    catalog = LatentCatalog.from_dir(env.sae, N_LATENTS)
    stats = {r.latent: r.stats.get("max", 0.0) for r in iter_examples(env.sae)}
    assert read_max_activations(env.sae) == {k: v for k, v in stats.items() if v > 0}
    live = [k for k, v in stats.items() if v > 0]
    assert live, "the test SAE should have live latents"
    lo, hi = catalog.slider_range(live[0])
    assert hi == pytest.approx(4 * stats[live[0]], rel=5e-3) and lo == -hi
    assert catalog.all_heuristic and "local heuristic" in catalog.provenance()
    # Search: every word must start a word of the label; a number finds that latent first.
    rec = catalog.info(live[0])
    word = rec.label.split("'")[1]
    assert live[0] in [h.latent for h in catalog.search(word)]
    assert catalog.search(str(live[0]))[0].latent == live[0]
    assert catalog.search("") == []


def test_catalog_search_matches_word_starts(tmp_path):
    lines = [{"latent": 0, "label": "rain and weather", "certainty": 0.5, "source": "x"},
             {"latent": 1, "label": "trained models", "certainty": 0.9, "source": "x"},
             {"latent": 2, "label": "Rainfall totals", "certainty": 0.8, "source": "x"}]
    (tmp_path / "latents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    catalog = LatentCatalog.from_dir(tmp_path, 3)
    assert [h.latent for h in catalog.search("rain")] == [2, 0]  # clearest first; not "trained"
    assert [h.latent for h in catalog.search("rain weather")] == [0]
    assert catalog.label(1) == "trained models" and not catalog.all_heuristic
    assert LatentCatalog.from_dir(tmp_path / "none", 3).label(2) == UNLABELLED
    assert catalog.slider_range(1, default=7.0) == (-7.0, 7.0)  # no top examples: the default
    with pytest.raises(ValueError, match="out of range"):
        catalog.info(3)


def test_attribution_is_the_summed_gradient(engine):
    """Each score equals the finite-difference change of (logit - mean logit) when the latent is raised
    by epsilon at every position, which is what steering it does."""
    ids = engine.encode_prompts(["The delegates gathered at the hall and"])[0]
    edits = [Edit(5, "add", 2.0)]
    model = engine.llm.model
    # The weights keep their gradients flag for generation (compiled decode regions run 2.3x slower on weights
    # that require none); attribution freezes them for its own pass only.
    assert all(p.requires_grad for p in model.parameters())
    result = attribute(engine, ids, edits=edits)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # nothing was differentiated into the weights
    caches = [b.attention.cache for b in model.layers]

    def metric_with(fn):
        """logit - mean logit of the explained token with ``fn`` at the site, without the KV cache."""
        for b in model.layers:
            b.attention.cache = None
        model.set_hooks(None, {SITE: fn})
        try:
            with torch.no_grad():
                logits = model(torch.tensor([ids[:-1]]), 0, last_only=True)[0, -1].double()
        finally:
            model.set_hooks(None, None)
            for b, c in zip(model.layers, caches):
                b.attention.cache = c
        return float(logits[ids[-1]] - logits.mean())

    def metric(extra):
        return metric_with(steer_fn(engine.sae, [*edits, *extra]))

    assert result.metric == pytest.approx(metric([]), abs=1e-4)
    eps = 1e-2
    for latent, _, score, _ in result.top(3, by="gradient") + result.top(2, by="gradient", negative=True):
        fd = (metric([Edit(latent, "add", eps)]) - metric([Edit(latent, "add", -eps)])) / (2 * eps)
        assert score == pytest.approx(fd, rel=2e-2, abs=2e-3)
    assert result.top(1, by="gradient")[0][2] > 0 > result.top(1, by="gradient", negative=True)[0][2]

    # Activation x gradient: the change of the metric when the latent's own activation is scaled by (1 + eps)
    # at every position (its decoder row times eps x its activation added), by finite differences.
    sae, steer = engine.sae, steer_fn(engine.sae, edits)

    def scaled(latent, e):
        def fn(x):
            y = steer(x)
            h = sae.encode(y)[..., latent:latent + 1].float()
            return y + (e * h * sae.W_dec[latent].float() / sae.norm_stats(y).out_scale).to(y.dtype)
        return metric_with(fn)

    top = result.top(3) + result.top(2, negative=True)
    assert top[0][1] > 0 > top[-1][1]
    for latent, contribution, _, act in top:
        fd = (scaled(latent, eps) - scaled(latent, -eps)) / (2 * eps)
        assert contribution == pytest.approx(fd, rel=2e-2, abs=2e-3) and act > 0
    never = int((result.max_acts == 0).nonzero()[0])
    assert float(result.contributions[never]) == 0.0  # a latent that did not fire contributed nothing
    # The caches are back and the model still generates as before.
    assert all(b.attention.cache is c for b, c in zip(model.layers, caches))
    with pytest.raises(ValueError, match="must be in 1.."):
        attribute(engine, ids, position=0)


def test_load_sae_of_the_env_is_usable(env):
    sae = load_sae(env.sae)
    assert sae.cfg.site == SITE and sae.cfg.n_latents == N_LATENTS


def test_a_transcoder_reads_the_mlp_input_and_steers_the_mlp_output(env, tmp_path):
    tc = SparseAutoencoder(SAEConfig(d_model=64, n_latents=N_LATENTS, k=4, site="L1TC"), seed=4)
    with torch.no_grad():
        tc.b_enc.fill_(0.02)
    tc.save(tmp_path / "tc")
    engine = Engine.load(ModelOptions(ckpt_dir=env.ckpt, max_seq_len=64, device="cpu", model_dtype="fp32"),
                         tmp_path / "tc", max_batch_size=2)
    steps, completions = _run(engine, PROMPTS[:1], GREEDY)
    model = engine.llm.model
    c = completions[0]
    full = c.prompt_tokens + c.tokens
    model.set_hooks(["L1TC"], None)
    try:
        mlp_in = model.forward_activations(torch.tensor([full]))["L1MI"][0]
    finally:
        model.set_hooks(None, None)
    h = engine.sae.encode(mlp_in.float())
    pos = len(c.prompt_tokens) - 1
    first = next(s for s in steps if s.token[0] is not None)
    vals, idx = h[pos].topk(5)
    assert [i for i, _ in first.latents[0]] == [int(i) for i, v in zip(idx, vals) if v > 0]
    # Steering keeps the MLP and moves its output: the same as the hook set by hand.
    edit = Edit(2, "add", 30.0)
    _, steered = _run(engine, PROMPTS[:1], GREEDY, [edit], top=0)
    model.set_hooks(None, {"L1TC": steer_fn(engine.sae, [edit])})
    try:
        ref = engine.llm.text_completion(PROMPTS[:1], temperature=0.0, max_gen_len=6)
    finally:
        model.set_hooks(None, None)
    assert steered[0].text == ref[0].text


# --------------------------------------------------------------------------- latent pages
def test_latent_page_holds_the_examples_on_disk_and_the_output_tokens(engine, env):
    from apps.latent_page import build_page, page_html
    from interpret import iter_examples

    latent = max(engine.catalog.max_acts, key=engine.catalog.max_acts.get)
    page = build_page(latent, engine.catalog, sae=engine.sae, model=engine.llm.model, tokenizer=engine.llm.tokenizer)
    (record,) = iter_examples(env.sae, [latent])
    assert [d.doc for d in page.top_examples(100)] == [d for d, _ in record.top["max"]]
    assert page.token_density == record.stats["active_tokens"] / record.stats["tokens"]
    # The output tokens: the decoder row put through the model's own final norm and unembedding.
    model = engine.llm.model
    with torch.no_grad():
        ref = model.output(model.norm(engine.sae.W_dec[latent].float()[None]))[0]
    rms = float(engine.sae.W_dec[latent].float().pow(2).mean().add(model.params.norm_eps).rsqrt())
    tok = engine.llm.tokenizer
    assert [t for t, _ in page.outputs.positive] == [tok.decode([int(i)]) for i in ref.topk(10).indices]
    assert [t for t, _ in page.outputs.negative] == [tok.decode([int(i)]) for i in (-ref).topk(10).indices]
    assert page.outputs.positive[0][1] * rms == pytest.approx(float(ref.max()), rel=1e-4)
    html = page_html(page)
    assert f'data-latent="{latent}"' in html and html.count('class="example"') >= len(record.top["max"][:10])
    first = record.docs[record.top["max"][0][0]]
    peak_token = first.tokens[max(first.acts, key=lambda pv: pv[1])[0]]
    assert f'title="{first.max_act:.3f}">{escape(peak_token)}</span>' in html  # the peak token, shaded by its value


def test_latent_command_prints_the_page(env, capsys):
    from apps.cli import main
    from interpret import iter_examples

    latent = max(LatentCatalog.from_dir(env.sae, N_LATENTS).max_acts.items(), key=lambda kv: kv[1])[0]
    assert main(["latent", "--sae", str(env.sae), "--ckpt-dir", str(env.ckpt), "--device", "cpu", "--json",
                 str(latent)]) == 0
    data = json.loads(capsys.readouterr().out)
    (record,) = iter_examples(env.sae, [latent])
    assert [e["doc"] for e in data["top_examples"]] == [d for d, _ in record.top["max"]][:10]
    assert data["label"] == LatentCatalog.from_dir(env.sae, N_LATENTS).label(latent) and data["output_tokens"]
    assert main(["latent", "--sae", str(env.sae), "--no-output-tokens", "--device", "cpu", str(latent)]) == 0
    out = capsys.readouterr().out
    assert f"Latent {latent}" in out and "Top examples" in out and "fires on" in out and "promotes" not in out
    assert main(["latent", "--sae", str(env.sae), "--no-output-tokens", "--device", "cpu", "999"]) == 2
    assert "out of range" in capsys.readouterr().err


# --------------------------------------------------------------------------- contrast
def test_mean_codes_and_contrast_through_the_model(engine, env, tmp_path, capsys):
    """Each text's mean code is computed here token by token from the stored activations (first token left
    out, as the SAE was trained); the contrast of two sets is Welch's t of those means."""
    from apps.contrast import run_contrast
    from apps.cli import main
    from sae.contrast import contrast

    a = ["It rained all night and the streets flooded.", "Heavy rain and thunder rolled over the hills.",
         "The storm brought rain, wind and hail."]
    b = ["The striker scored twice in the second half.", "The goalkeeper saved a penalty in the final.",
         "Fans sang as the team lifted the cup."]
    ids = engine.encode_texts(a + b)
    means = engine.mean_codes(ids, batch_size=4)  # batches of 4: padding must not leak into the means
    for i, seq in enumerate(ids):
        acts = _site_acts(engine, seq)[1:]
        ref = engine.sae.encode(acts).float().mean(0)
        torch.testing.assert_close(means[i], ref, rtol=1e-4, atol=1e-5)
    rows = run_contrast(engine, a, b, top=5)
    assert [r.latent for r in rows] == [r.latent for r in contrast(means[:3], means[3:], top=5)]
    # One text against the corpus baseline of the top-examples pass.
    lifts = run_contrast(engine, a[:1], [], top=3)
    baseline = engine.catalog.mean_acts_tensor()
    assert lifts and lifts[0].baseline == pytest.approx(float(baseline[lifts[0].latent]))
    (tmp_path / "a.txt").write_text("\n".join(a))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in b))
    assert main(["contrast", "--sae", str(env.sae), "--ckpt-dir", str(env.ckpt), "--device", "cpu", "--model-dtype",
                 "fp32", "--a", str(tmp_path / "a.txt"), "--b", str(tmp_path / "b.jsonl"), "--top", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["latent"] for r in printed] == [r.latent for r in rows] and "label" in printed[0]


# --------------------------------------------------------------------------- dashboards
def test_export_dashboard_holds_the_top_examples_on_disk(env, tmp_path):
    from apps.cli import main
    from interpret import iter_examples

    out = tmp_path / "dash"
    assert main(["export-dashboard", "--sae", str(env.sae), "--ckpt-dir", str(env.ckpt), "--out", str(out),
                 "--latents", "0-9", "--batch-size", "4"]) == 0
    batches = sorted((out / "neuronpedia").glob("batch-*.json"))
    assert [b.name for b in batches] == ["batch-0.json", "batch-1.json", "batch-2.json"]
    features = [f for b in batches for f in json.loads(b.read_text())["features"]]
    assert [f["feature_index"] for f in features] == list(range(10))
    for f, rec in zip(features, iter_examples(env.sae, range(10))):
        top = [a for a in f["activations"] if a["bin_min"] == -1]
        assert [a["tokens"] for a in top] == [rec.docs[d].tokens for d, _ in rec.top["max"]]
        for a, (d, v) in zip(top, rec.top["max"]):
            assert max(a["values"]) == pytest.approx(v, rel=1e-5)  # the document's strongest activation
        assert f["frac_nonzero"] == pytest.approx(rec.stats["active_tokens"] / rec.stats["tokens"])
        assert len(f["pos_str"]) == 10 and f["pos_values"] == sorted(f["pos_values"], reverse=True)
        assert sum(f["logits_hist_data_bar_heights"]) > 0
    site = out / "site"
    index = (site / "index.html").read_text()
    assert "search labels" in index and all(f'href="latent-{i}.html"' in index for i in range(10))
    page = (site / "latent-3.html").read_text()
    assert 'href="index.html"' in page and 'data-latent="3"' in page
    assert 'href="latent-2.html"' in page and 'href="latent-4.html"' in page
    assert 'href="latent-10.html"' not in (site / "latent-9.html").read_text()  # only exported latents are linked
    labels = json.loads((out / "neuronpedia" / "explanations.json").read_text())
    assert [x["index"] for x in labels] == list(range(10)) and labels[0]["description"]


# --------------------------------------------------------------------------- steering evaluation
def test_steer_eval_scores_concept_and_fluency_against_references(env, tmp_path, capsys):
    """The concept score is the latent's activation on the generated tokens, recomputed here from the
    stored activations; the fluency the mean log-prob under the unsteered model, recomputed here."""
    from apps.cli import main
    from apps.steer_eval import SteerEvalConfig, evaluate

    engine = Engine.load(ModelOptions(ckpt_dir=env.ckpt, max_seq_len=64, device="cpu", model_dtype="fp32"), env.sae,
                         max_batch_size=3)
    latent = max(engine.catalog.max_acts, key=engine.catalog.max_acts.get)
    cfg = SteerEvalConfig(sae=env.sae, latent=latent, strengths="1,4", samples=3, max_new_tokens=5, temperature=0.0,
                          ckpt_dir=env.ckpt)
    report = evaluate(engine, cfg, ["The delegates gathered at the", "Hello"])
    assert [r["condition"] for r in report["results"]][:1] == ["unsteered"] and len(report["results"]) == 4
    strong = report["results"][-1]
    # Recompute the strongest condition by hand.
    tokens = engine.encode_prompts(report["prompts"])
    *_, last = engine.stream(tokens, Sampling(0.0, 0.9, 42, 5), [Edit(latent, "add", 4 * report["max_act"])],
                             top_latents=0)
    acts, logps = [], []
    model = engine.llm.model
    for p, c in zip(tokens, last.completions):
        seq = p + list(c.tokens)
        a = engine.sae.encode(_site_acts(engine, seq)).float()[len(p):, latent]
        acts += a.tolist()
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq]), 0)[0].float(), -1)
        logps += [float(lp[t - 1, seq[t]]) for t in range(len(p), len(seq))]
    assert strong["concept_mean_act"] == pytest.approx(sum(acts) / len(acts), rel=1e-4, abs=1e-5)
    assert strong["fluency"] == pytest.approx(sum(logps) / len(logps), rel=1e-4)
    out = tmp_path / "se"
    assert main(["steer-eval", "--sae", str(env.sae), "--ckpt-dir", str(env.ckpt), "--device", "cpu",
                 "--model-dtype", "fp32", "--latent", str(latent), "--strengths", "2", "--samples", "2",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    saved = json.loads((out / "steer_eval.json").read_text())
    assert [r["condition"] for r in saved["results"]][1].startswith("prompting:") and "fluency" in capsys.readouterr().out
