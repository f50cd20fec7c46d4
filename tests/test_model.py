"""The model against HF transformers on tiny random weights: logits, KV cache, hook sites, SAE functions."""

from __future__ import annotations

import pytest
import torch

from helpers import make_random_model, random_tokens, rel_err, tiny_args, to_hf_model
from llama3.model import POINTS, SHORT_NAMES, TRANSCODER, Site, parse_site, site_name

TOL = 1e-5  # relative error in fp32; a wrong RoPE factor moves logits by ~3e-5 at 500 positions
SEQ = 500


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# --------------------------------------------------------------------------- logits vs HF
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_logits_match_hf(factor, tie):
    model = make_random_model(tiny_args(rope_scaling_factor=factor, tie_word_embeddings=tie), seed=1)
    tokens = random_tokens(300, batch=2, seq=SEQ, seed=1)
    ref = to_hf_model(model)(tokens).logits
    out = model(tokens)
    assert out.dtype == torch.float32 and out.shape == (2, SEQ, 300)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("ours,theirs", [(8.0, 32.0), (32.0, 8.0)])
def test_wrong_rope_factor_fails_the_tolerance(ours, theirs):
    """The logits test has teeth: the two Llama 3 RoPE factors are told apart at this tolerance."""
    model = make_random_model(tiny_args(rope_scaling_factor=ours), seed=1)
    tokens = random_tokens(300, batch=2, seq=SEQ, seed=1)
    ref = to_hf_model(model, rope_factor=theirs)(tokens).logits
    assert rel_err(model(tokens), ref) > TOL


def test_unperturbed_norms_would_hide_a_missing_norm_weight():
    """init_random_weights(norm_jitter=...) really moves the norm weights off 1 (so they are tested)."""
    model = make_random_model(seed=1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert (p - 1).abs().max() > 0.05, name


# --------------------------------------------------------------------------- KV cache
def test_kv_cache_incremental_decoding_equals_full_forward():
    model = make_random_model(seed=2)
    tokens = random_tokens(300, batch=2, seq=160, seed=2)
    full = model(tokens)
    model.setup_cache(max_batch_size=2, max_seq_len=256)
    try:
        pieces = [model(tokens[:, :100], 0)]  # prefill
        for pos in range(100, 110):  # one token at a time, int positions
            pieces.append(model(tokens[:, pos:pos + 1], pos))
        pieces.append(model(tokens[:, 110:140], 110))  # a chunk continuing from the cache
        for pos in range(140, 150):  # the static-shape path: 0-dim tensor positions
            pieces.append(model(tokens[:, pos:pos + 1], torch.tensor(pos)))
        pieces.append(model(tokens[:, 150:160], torch.tensor(150)))  # tensor-position chunk
        incremental = torch.cat(pieces, dim=1)
        assert incremental.shape == full.shape
        assert rel_err(incremental, full) <= TOL
        # last_only gives the last position of the same step
        last = model(tokens[:, 150:160], 150, last_only=True)
        assert rel_err(last, full[:, -1:]) <= TOL
    finally:
        model.free_cache()


def test_kv_cache_tensor_prefill_from_zero():
    model = make_random_model(seed=3)
    tokens = random_tokens(300, batch=1, seq=40, seed=3)
    full = model(tokens)
    model.setup_cache(1, 64)
    out = torch.cat([model(tokens[:, :20], torch.tensor(0))]
                    + [model(tokens[:, p:p + 1], torch.tensor(p)) for p in range(20, 40)], dim=1)
    assert rel_err(out, full) <= TOL


# --------------------------------------------------------------------------- hook sites vs HF
def _hf_module_outputs(hf, tokens):
    """Run HF with forward hooks; returns {(layer, point): tensor} for the module-output sites."""
    got: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keep(key):
        def hook(_module, _inputs, output):
            got[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    for i, layer in enumerate(hf.model.layers):
        handles += [
            layer.input_layernorm.register_forward_hook(keep((i, "attn_in"))),
            layer.self_attn.register_forward_hook(keep((i, "attn_out"))),
            layer.post_attention_layernorm.register_forward_hook(keep((i, "mlp_in"))),
            layer.mlp.register_forward_hook(keep((i, "mlp_out"))),
            layer.register_forward_hook(keep((i, "resid_post"))),
        ]
    try:
        out = hf(tokens, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return got, out.hidden_states


def test_hook_sites_match_hf_tensors():
    n_layers = 3
    all_sites = [Site(layer, point) for layer in range(n_layers) for point in POINTS]
    model = make_random_model(tiny_args(n_layers=n_layers), seed=4, store_layer_activ=all_sites)
    tokens = random_tokens(300, batch=2, seq=64, seed=4)
    logits = model(tokens)
    acts = model.activations
    assert set(acts) == {site_name(s) for s in all_sites}
    assert all(a.shape == (2, 64, 64) for a in acts.values())

    hf = to_hf_model(model)
    hf_out, hidden = _hf_module_outputs(hf, tokens)
    assert len(hidden) == n_layers + 1
    for layer in range(n_layers):
        def ours(point):
            return acts[site_name((layer, point))]

        # hidden_states[L] is block L's input
        assert rel_err(ours("resid_pre"), hidden[layer]) <= TOL, layer
        for point in ("attn_in", "attn_out", "mlp_in", "mlp_out", "resid_post"):
            assert rel_err(ours(point), hf_out[(layer, point)]) <= TOL, (layer, point)
        assert rel_err(ours("resid_mid"), hidden[layer] + hf_out[(layer, "attn_out")]) <= TOL, layer
        if layer + 1 < n_layers:  # hidden_states[L+1] is block L's output ...
            assert rel_err(ours("resid_post"), hidden[layer + 1]) <= TOL, layer
    # ... except the last entry, which HF takes after the final norm
    last = acts[site_name((n_layers - 1, "resid_post"))]
    assert rel_err(model.norm(last), hidden[n_layers]) <= TOL
    assert rel_err(last, hidden[n_layers]) > 1e-2
    # storing activations does not change the logits
    assert torch.equal(logits, make_random_model(tiny_args(n_layers=n_layers), seed=4)(tokens))


def test_stored_activation_is_taken_before_the_sae_function():
    shift = torch.full((64,), 0.5)
    plain = make_random_model(seed=5, store_layer_activ=["L0R"])
    spliced = make_random_model(seed=5, store_layer_activ=["L0R"], sae_layer_forward_fn={"L0R": lambda x: x + shift})
    tokens = random_tokens(300, batch=1, seq=16, seed=5)
    plain(tokens), spliced(tokens)
    assert torch.equal(plain.activations["L0R"], spliced.activations["L0R"])


# --------------------------------------------------------------------------- site names
@pytest.mark.parametrize("text,expected", [
    ("L15R", Site(15, "resid_post")), ("L15A", Site(15, "attn_out")), ("L15M", Site(15, "mlp_out")),
    ("L15TC", Site(15, TRANSCODER)), ("L3RM", Site(3, "resid_mid")), ("L3RP", Site(3, "resid_pre")),
    ("L0AI", Site(0, "attn_in")), ("L0MI", Site(0, "mlp_in")), ("L7.mlp_in", Site(7, "mlp_in")),
    (" L2R ", Site(2, "resid_post")), ("19", Site(19, "resid_post")), (19, Site(19, "resid_post")),
    ((4, "attn_out"), Site(4, "attn_out")), (Site(1, "mlp_out"), Site(1, "mlp_out")),
])
def test_parse_site(text, expected):
    assert parse_site(text) == expected


def test_site_short_names_round_trip():
    for code, point in SHORT_NAMES.items():
        name = f"L12{code}"
        assert site_name(name) == name
        assert parse_site(site_name(Site(12, point))) == Site(12, point)
        assert parse_site(f"L12.{point}") == Site(12, point)
    assert str(Site(15, "resid_post")) == "L15R"


@pytest.mark.parametrize("bad", ["L15X", "15R", "", "L-1R", "LR", "L1.bogus", "l1r", (0, "bogus"), (-1, "attn_in"),
                                 True, 1.5, None, [1, "resid_post"]])
def test_parse_site_errors_are_value_errors(bad):
    with pytest.raises(ValueError):
        parse_site(bad)


def test_hook_sites_are_checked_against_the_model():
    model = make_random_model()
    with pytest.raises(ValueError, match="past the last layer"):
        model.set_hooks(store_layer_activ=["L2R"])
    with pytest.raises(ValueError, match="past the last layer"):
        model.set_hooks(sae_layer_forward_fn={5: lambda x: x})
    with pytest.raises(ValueError, match="callable"):
        model.set_hooks(sae_layer_forward_fn={"L0R": 3})


# --------------------------------------------------------------------------- SAE functions
def test_identity_sae_function_at_every_point_is_bit_identical():
    tokens = random_tokens(300, batch=2, seq=48, seed=6)
    base = make_random_model(seed=6)(tokens)
    every = {Site(layer, point): (lambda x: x) for layer in range(2) for point in POINTS}
    model = make_random_model(seed=6, sae_layer_forward_fn=every, store_layer_activ=list(every))
    assert torch.equal(model(tokens), base)
    # and through the KV cache
    assert torch.equal(_cached(model, tokens, 40), _cached(make_random_model(seed=6), tokens, 40))


def _cached(model, tokens, prefill):
    model.setup_cache(tokens.shape[0], 64)
    return torch.cat([model(tokens[:, :prefill], 0)]
                     + [model(tokens[:, p:p + 1], p) for p in range(prefill, tokens.shape[1])], dim=1)


@pytest.mark.parametrize("site", ["L0RP", "L0AI", "L0A", "L0RM", "L1MI", "L1M", "L1R"])
def test_sae_function_applies_at_every_position_with_and_without_cache(site):
    shift = 0.05 * torch.randn(64, generator=torch.Generator().manual_seed(7))
    calls = []

    def f(x):
        calls.append(x.shape[1])
        return x + shift

    tokens = random_tokens(300, batch=2, seq=40, seed=7)
    base = make_random_model(seed=7)(tokens)
    model = make_random_model(seed=7, sae_layer_forward_fn={site: f})
    full = model(tokens)
    assert rel_err(full, base) > 1e-3  # the function does something
    assert calls == [40]
    calls.clear()
    incremental = _cached(model, tokens, prefill=25)
    assert calls == [25] + [1] * 15
    assert rel_err(incremental, full) <= TOL
    model.setup_cache(2, 64)  # the static-shape path too
    static = torch.cat([model(tokens[:, :25], 0)]
                       + [model(tokens[:, p:p + 1], torch.tensor(p)) for p in range(25, 40)], dim=1)
    assert rel_err(static, full) <= TOL


def test_sae_function_at_block_input_equals_shifting_the_embeddings():
    """An independent check that the function hits every position: adding c at L0's input is the same
    as adding c to every row of the (untied) embedding matrix."""
    shift = 0.05 * torch.randn(64, generator=torch.Generator().manual_seed(8))
    tokens = random_tokens(300, batch=2, seq=40, seed=8)
    model = make_random_model(seed=8, sae_layer_forward_fn={"L0RP": lambda x: x + shift})
    shifted = make_random_model(seed=8)
    shifted.tok_embeddings.weight += shift
    assert rel_err(model(tokens), shifted(tokens)) <= TOL


def test_transcoder_site_replaces_the_mlp():
    tokens = random_tokens(300, batch=2, seq=32, seed=9)
    base = make_random_model(seed=9)
    # the MLP itself as the "transcoder" gives the same logits
    same = make_random_model(seed=9)
    same.set_hooks(sae_layer_forward_fn={"L1TC": same.layers[1].feed_forward})
    assert torch.equal(same(tokens), base(tokens))
    # a transcoder that outputs zeros equals a model whose MLP down-projection is zero
    seen = []
    zeroed = make_random_model(seed=9, store_layer_activ=["L1TC"],
                               sae_layer_forward_fn={(1, TRANSCODER): lambda m: seen.append(m) or torch.zeros_like(m)})
    reference = make_random_model(seed=9, store_layer_activ=["L1MI"])
    reference.layers[1].feed_forward.w2.weight.zero_()
    out = zeroed(tokens)
    assert rel_err(out, reference(tokens)) <= TOL and rel_err(out, base(tokens)) > 1e-3
    assert set(zeroed.activations) == {"L1MI", "L1M"}  # a transcoder site stores both ends of the MLP
    assert torch.equal(seen[0], zeroed.activations["L1MI"])
    assert torch.equal(zeroed.activations["L1MI"], reference.activations["L1MI"])
    assert not zeroed.activations["L1M"].any()


# --------------------------------------------------------------------------- activations only
def test_forward_activations_stops_after_the_deepest_stored_site():
    args = tiny_args(n_layers=4)
    tokens = random_tokens(300, batch=2, seq=24, seed=10)
    sites = [0, "L1A", "L1MI"]
    full = make_random_model(args, seed=10, store_layer_activ=sites)
    full(tokens)

    model = make_random_model(args, seed=10, store_layer_activ=sites)
    ran = []

    def forbidden(name):
        def f(*a, **k):
            raise AssertionError(f"{name} ran")
        return f

    for i in (2, 3):
        model.layers[i].forward = forbidden(f"layer {i}")
    model.norm.forward = forbidden("final norm")
    model.output.forward = forbidden("output head")
    model.layers[1].register_forward_hook(lambda *a: ran.append(1))

    acts = model.forward_activations(tokens)
    assert ran == [1]
    assert set(acts) == {"L0R", "L1A", "L1MI"} and acts is model.activations
    for k in acts:
        assert torch.equal(acts[k], full.activations[k]), k
    # no KV cache was allocated
    assert model.cache_shape is None
    assert all(block.attention.cache is None for block in model.layers)
    assert not any("cache" in name for name, _ in model.named_buffers())
    # the full forward really does reach the forbidden parts (so the check above has teeth)
    with pytest.raises(AssertionError, match="layer 2 ran"):
        model(tokens)


def test_forward_activations_needs_sites():
    with pytest.raises(ValueError, match="store_layer_activ"):
        make_random_model().forward_activations(random_tokens(300, 1, 4))


def test_forward_input_errors():
    model = make_random_model()
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 513, dtype=torch.long))


def test_hooks_context_removes_the_hooks_even_after_an_error():
    model = make_random_model(tiny_args(), seed=4)
    tokens = random_tokens(model.params.vocab_size, batch=1, seq=6)
    with torch.no_grad():
        clean = model(tokens)
        with model.hooks(["L0R"], {"L1R": lambda x: x * 0}) as m:
            assert m is model and model.store_sites and model.sae_fns
            zeroed = model(tokens)
        assert model.store_sites == () and model.sae_fns == {}
        assert not torch.equal(zeroed, clean) and torch.equal(model(tokens), clean)
        with pytest.raises(RuntimeError, match="boom"):
            with model.hooks(None, {"L1R": lambda x: x}):
                raise RuntimeError("boom")
        assert model.sae_fns == {}
    assert model.max_seq_len == model.rope_cos.shape[0] == tiny_args().max_seq_len


def test_without_cache_is_a_plain_forward_and_leaves_the_cache_alone():
    model = make_random_model(tiny_args(), seed=4)
    model.setup_cache(1, 32)
    tokens = random_tokens(model.params.vocab_size, batch=1, seq=5)
    with torch.no_grad():
        model(tokens, 0)  # fills the first 5 cache slots
        before = [b.attention.cache.k.clone() for b in model.layers]
        plain = make_random_model(tiny_args(), seed=4)(tokens[:, :3])
        with model.without_cache():
            out = model(tokens[:, :3])
        after = [b.attention.cache.k for b in model.layers]
    torch.testing.assert_close(out, plain)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
