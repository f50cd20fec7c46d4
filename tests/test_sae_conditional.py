"""Conditional steering: an edit with ``when=`` applies exactly at the positions (and rows) where the
condition on the unedited latent activations holds -- checked against a position-by-position manual
splice, with and without the KV cache; and the contrast statistics on planted features."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_random_model
from llama3 import ModelArgs
from sae import Edit, SAEConfig, SparseAutoencoder, steer_fn
from sae.conditions import Condition
from sae.contrast import contrast, contrast_with_baseline, rerank_by_query

SITE = "L1R"


def _sae(d: int = 64, n: int = 32) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_model=d, n_latents=n, k=6, site=SITE, normalization="none"), seed=3)
    with torch.no_grad():
        sae.W_enc.mul_(4.0)  # activations of order 1, so thresholds split positions
    return sae


def test_conditions_parse_and_evaluate():
    c = Condition.parse("12>0.75 & 5<=1 | 7 > 0")
    assert [[str(t) for t in g] for g in c.any_of] == [["12>0.75", "5<=1"], ["7>0"]] and c.latents == [5, 7, 12]
    acts = {12: torch.tensor([1.0, 1.0, 0.0, 0.0]), 5: torch.tensor([0.5, 2.0, 0.0, 0.0]),
            7: torch.tensor([0.0, 0.0, 0.3, 0.0])}
    assert c.holds(acts.__getitem__).tolist() == [True, False, True, False]
    assert Condition.parse("3 > 1 and 4 < 2 or 5 == 0").any_of[1][0].op == "=="
    with pytest.raises(ValueError, match="LATENT OP VALUE"):
        Condition.parse("12 >> 3")


def test_conditional_edit_equals_a_position_by_position_splice():
    torch.manual_seed(0)
    sae = _sae()
    x = torch.randn(2, 9, 64)
    h = sae.encode(x.reshape(-1, 64)).reshape(2, 9, -1)
    on = h[..., 4] > 0  # latent 4 fires at some positions only
    assert 0 < int(on.sum()) < on.numel()
    cond = Condition.parse("4>0")
    edit = Edit(9, "add", 3.0, when=cond)
    got = steer_fn(sae, [edit])(x)
    plain = steer_fn(sae, [Edit(9, "add", 3.0)])
    for b in range(2):
        for t in range(9):
            want = plain(x[b:b + 1, t:t + 1])[0, 0] if on[b, t] else x[b, t]
            torch.testing.assert_close(got[b, t], want, rtol=1e-5, atol=1e-5)
    # Rows: the condition and the rows both have to hold.
    rowed = steer_fn(sae, [Edit(9, "add", 3.0, rows=(1,), when=cond)])(x)
    assert torch.equal(rowed[0], x[0])
    torch.testing.assert_close(rowed[1], got[1])


def test_conditional_steering_is_the_same_with_and_without_the_kv_cache():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=300, max_seq_len=32,
                     max_batch_size=2)
    model = make_random_model(args, seed=1)
    sae = _sae()
    model.setup_cache(2, 32)
    model.set_hooks([SITE], None)
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        acts = model.forward_activations(tokens)[SITE]
    h = sae.encode(acts.reshape(-1, 64)).reshape(2, 12, -1)
    latent = int((h > 0).float().mean((0, 1)).sub(0.5).abs().argmin())  # one that fires about half the time
    edit = Edit(2, "add", 5.0, when=Condition.parse(f"{latent}>0"))
    model.set_hooks(None, {SITE: steer_fn(sae, [edit])})
    with torch.no_grad():
        full = model(tokens, 0)  # no cache use: one forward over every position
        steps = [model(tokens[:, :4], 0)[:, -1]]
        for t in range(4, 12):  # decoding one position at a time through the cache
            steps.append(model(tokens[:, t:t + 1], t)[:, -1])
    torch.testing.assert_close(torch.stack(steps[1:], 1), full[:, 4:], rtol=1e-4, atol=1e-4)
    model.set_hooks(None, None)
    with torch.no_grad():
        base = model(tokens, 0)
    on = h[..., latent] > 0
    changed = (full - base).abs().amax(-1) > 1e-6
    # The first position the condition holds at changes the logits there; before it nothing changes.
    first = [int(on[b].nonzero()[0]) if bool(on[b].any()) else 12 for b in range(2)]
    for b in range(2):
        assert not bool(changed[b, :first[b]].any())
        if first[b] < 12:
            assert bool(changed[b, first[b]])


def test_edit_parse_keeps_its_condition():
    e = Edit.parse("896=20", when=Condition.parse("12>0.75"))
    assert e.when is not None and e.when.latents == [12] and e.value == 20.0


# --------------------------------------------------------------------------- contrast statistics
def test_contrast_finds_the_planted_latent_and_its_significance():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, 50, generator=g) * 0.2
    b = torch.rand(30, 50, generator=g) * 0.2
    a[:, 7] += 1.0  # planted: latent 7 is much stronger in A
    b[:, 3] += 0.5  # and latent 3 in B
    a[0, 11] = 30.0  # one outlier text: a big mean difference, but not a consistent one
    rows = contrast(a, b, top=5)
    assert rows[0].latent == 7 and rows[0].t > 10 and rows[0].p_adjusted < 1e-6
    assert 11 not in [r.latent for r in rows[:2]]
    # Welch's t by hand.
    ma, mb = a[:, 7].double().mean(), b[:, 7].double().mean()
    t = (ma - mb) / math.sqrt(a[:, 7].double().var() / 40 + b[:, 7].double().var() / 30)
    assert rows[0].t == pytest.approx(float(t), rel=1e-9)
    assert contrast(a, b, top=1, direction="b")[0].latent == 3
    lifts = contrast_with_baseline(a[0], torch.full((50,), 0.1), top=3)
    assert lifts[0].latent == 11 and lifts[0].lift == pytest.approx(float(a[0, 11]) - 0.1)
    labels = {7: "rain and storms", 3: "football", 11: "rainfall"}
    assert [r.latent for r in rerank_by_query(rows[:3], labels, "rain")][:1] in ([7], [11])
    with pytest.raises(ValueError, match="at least 2 texts"):
        contrast(a[:1], b)


# --------------------------------------------------------------------------- feature geometry
def test_geometry_finds_matched_split_and_novel_latents_of_planted_saes(tmp_path):
    """A's 20 directions are known; B holds 12 of them again (matched), splits 3 of them into two halves
    each (the direction tilted either way), and 6 random ones (novel)."""
    from apps.cli import main
    from sae.geometry import match_latents

    g = torch.Generator().manual_seed(0)
    d = 64
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))  # orthonormal directions: a clean reference
    a = q[:20]
    tilt = q[40:43]
    splits = [a[12 + i] * 0.8 + s * 0.6 * tilt[i] for i in range(3) for s in (1, -1)]
    b = torch.cat([a[:12], torch.stack(splits), q[50:56]])
    m = match_latents(a * 3.0, b * 0.5)  # row norms do not matter, only directions
    assert m.kind == ["matched"] * 12 + ["split"] * 6 + ["novel"] * 6
    assert m.splits == {12: [12, 13], 13: [14, 15], 14: [16, 17]}
    assert m.best[:12].tolist() == list(range(12)) and torch.allclose(m.cosine[12:18], torch.tensor(0.8))
    # The command: both SAEs on disk, a report and a map.
    for name, dec in (("a", a), ("b", b)):
        sae = SparseAutoencoder(SAEConfig(d_model=d, n_latents=dec.shape[0], k=4, site=SITE), seed=0)
        with torch.no_grad():
            sae.W_dec.copy_(dec)
        sae.save(tmp_path / name)
    assert main(["geometry", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--out", str(tmp_path / "g")]) == 0
    import json

    rep = json.loads((tmp_path / "g" / "geometry.json").read_text())
    assert rep["counts"] == {"matched": 12, "split": 6, "near": 0, "novel": 6}
    assert [s["a"] for s in rep["splits"]] == [12, 13, 14]
    if rep.get("map"):
        assert (tmp_path / "g" / "geometry.png").stat().st_size > 0


def test_additive_edits_skip_the_encoder_and_equal_the_full_path():
    """An add edit moves every token by value x its decoder row (mapped out of the normalised space): the
    fast path computes that without the encoder, and equals the full path (forced here by a condition
    that always holds) and the hand formula."""
    sae = SparseAutoencoder(SAEConfig(d_model=64, n_latents=32, k=6, site=SITE, normalization="per_token"), seed=4)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    fast = steer_fn(sae, [Edit(3, "add", 2.5), Edit(8, "add", -1.0, rows=(1,))])(x)
    always = Condition.parse("0>=-1000")
    full = steer_fn(sae, [Edit(3, "add", 2.5, when=always), Edit(8, "add", -1.0, rows=(1,), when=always)])(x)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    scale = 1.0 / (x.std(-1, keepdim=True) + sae.cfg.norm_eps)  # per-token out scale
    ref = x + 2.5 * sae.W_dec[3] / scale
    ref[1] = ref[1] - 1.0 * sae.W_dec[8] / scale[1]
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    calls = []
    real = sae.code_normalized
    sae.code_normalized = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]
    steer_fn(sae, [Edit(3, "add", 2.5)])(x)
    assert calls == []  # the encoder never ran
