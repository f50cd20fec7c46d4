"""Steering and reconstruction functions, alone and spliced into a tiny llama3 model (with and without
the KV cache)."""

import pytest
import torch
from helpers import make_random_model, tiny_args

from sae import Edit, SAEConfig, SparseAutoencoder, reconstruct_fn, sae_hooks, steer_fn

D, L = 64, 256


def make_sae(normalization="none", site="L1R", activation="topk"):
    k = 8 if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=L, k=k, architecture=activation,
                                      normalization=normalization, site=site), seed=0)
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(L, generator=torch.Generator().manual_seed(1)))
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.02)
    if normalization == "dataset":
        sae.set_dataset_norm(2.5, 3.5, shift=torch.full((D,), 0.1))
    return sae


def acts(shape=(3, 5), seed=0):
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed))


def dense_reference(sae, x, edits):
    """x + decode(h_edited) - decode(h) with a dense code and the decoder written out."""
    flat = x.reshape(-1, D).float()
    B = x.shape[0]
    rows = torch.arange(B).repeat_interleave(flat.shape[0] // B)
    h = sae.encode(flat).detach()
    he = h.clone()
    for e in edits:
        sel = torch.ones_like(rows, dtype=torch.bool) if e.rows is None else torch.isin(rows, torch.tensor(e.rows))
        col = he[:, e.latent]
        new = {"add": lambda c: c + e.value, "set": lambda c: torch.full_like(c, e.value),
               "zero": torch.zeros_like, "clamp": lambda c: c.clamp(e.min, e.max)}[e.op](col)
        he[:, e.latent] = torch.where(sel, new, col)
    stats = sae.norm_stats(flat)

    def dec(code):
        return (code @ sae.W_dec.detach() + sae.b_pre.detach()) / stats.out_scale + stats.shift

    return (flat + dec(he) - dec(h)).reshape(x.shape), h, he


# ----------------------------------------------------------------------------- the functions
@pytest.mark.parametrize("normalization", ["none", "per_token", "dataset"])
def test_no_edit_steer_is_identity(normalization):
    sae = make_sae(normalization)
    x = acts()
    assert steer_fn(sae)(x) is x
    # An edit that changes nothing (zeroing an inactive latent, adding 0) also returns x bit for bit.
    h = sae.encode(x)
    inactive = int((h == 0).all(0).all(0).nonzero()[0])
    assert torch.equal(steer_fn(sae, [Edit(inactive, "zero"), Edit(3, "add", 0.0)])(x), x)


@pytest.mark.parametrize("normalization", ["none", "per_token", "dataset"])
def test_edit_path_adds_decode_difference(normalization):
    sae = make_sae(normalization)
    x = acts()
    h = sae.encode(x).reshape(-1, L)
    active = int(h.ne(0).sum(0).argmax())  # a latent active on many tokens, so set/clamp/zero bite
    edits = [Edit(5, "add", 4.0, rows=(0, 2)), Edit(active, "set", 0.5, rows=(1,)), Edit(active, "zero", rows=(2,)),
             Edit(17, "add", -1.0), Edit(active, "clamp", max=0.01, rows=(0,))]
    out = steer_fn(sae, edits)(x)
    ref, h0, he = dense_reference(sae, x, edits)
    assert not torch.equal(h0, he)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.dtype == x.dtype and out.shape == x.shape


def test_rows_without_edits_are_untouched_bitwise():
    sae = make_sae("per_token")
    x = acts((4, 6)).to(torch.bfloat16)
    out = steer_fn(sae, [Edit(9, "add", 3.0, rows=(1, 3))])(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.equal(out[1], x[1]) and not torch.equal(out[3], x[3])


def test_add_is_applied_after_the_activation():
    # The seed added its bias before TopK, where a latent outside the top k is dropped again.
    sae = make_sae()
    x = acts((1, 1))
    h = sae.encode(x)
    off = int((h[0, 0] == 0).nonzero()[0])
    out = steer_fn(sae, [Edit(off, "add", 2.0)])(x)
    torch.testing.assert_close(out - x, (2.0 * sae.W_dec[off]).detach().expand_as(x), rtol=1e-5, atol=1e-6)


def test_reconstruct_fn_equals_decode_encode():
    for normalization in ("none", "per_token", "dataset"):
        sae = make_sae(normalization)
        x = acts()
        stats = sae.norm_stats(x.reshape(-1, D))
        ref = sae.decode(sae.encode(x).reshape(-1, L), stats).reshape(x.shape)
        torch.testing.assert_close(reconstruct_fn(sae)(x), ref, rtol=1e-6, atol=1e-6)


def test_edit_validation_and_parse():
    assert Edit.parse("896=20") == Edit(896, "add", 20.0)
    assert Edit.parse("896:set=5", rows=[1]) == Edit(896, "set", 5.0, rows=(1,))
    assert Edit.parse("3:zero") == Edit(3, "zero")
    assert Edit.parse("3:clamp=0..8") == Edit(3, "clamp", min=0.0, max=8.0)
    assert Edit.parse("3:clamp=..8") == Edit(3, "clamp", max=8.0)
    for bad in ("x=1", "3:mul=2", "3:set", "3:clamp=5", "3=abc", "3:zero=1"):
        with pytest.raises(ValueError):
            Edit.parse(bad)
    with pytest.raises(ValueError, match="min=2.0 > max=1.0"):
        Edit(1, "clamp", min=2.0, max=1.0)
    sae = make_sae()
    with pytest.raises(ValueError, match="latents 0..255"):
        steer_fn(sae, [Edit(256, "add", 1.0)])
    with pytest.raises(ValueError, match="row 5"):
        steer_fn(sae, [Edit(1, "add", 1.0, rows=(5,))])(acts((2, 3)))


# ----------------------------------------------------------------------------- inside llama3
@pytest.fixture(scope="module")
def model():
    return make_random_model(tiny_args(vocab_size=256), seed=3)


def test_injection_is_checked_against_the_model(model):
    sae = make_sae()
    assert set(sae_hooks(sae, model)) == {(1, "resid_post")}
    with pytest.raises(ValueError, match="width is 64"):
        bad = SparseAutoencoder(SAEConfig(d_model=32, n_latents=64, k=4, site="L1R"))
        sae_hooks(bad, model)
    with pytest.raises(ValueError, match="past the model's last layer"):
        sae_hooks(make_sae(site="L5R"), model)
    with pytest.raises(ValueError, match="pass site"):
        sae_hooks(make_sae(site=None), model)
    with pytest.raises(ValueError, match="trained at L1R, not L0R"):
        sae_hooks(sae, model, site="L0R")
    assert set(sae_hooks(make_sae(site=None), model, site="L0A")) == {(0, "attn_out")}
    with pytest.raises(ValueError, match="mode='steer'"):
        sae_hooks(sae, model, mode="reconstruct", edits=[Edit(1, "add", 1.0)])


def test_no_edit_steer_through_the_model_is_identity(model):
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(tokens)
        with model.hooks(None, sae_hooks(make_sae("per_token"), model)):
            steered = model(tokens)
    assert torch.equal(clean, steered)


def test_reconstruct_splice_reaches_the_following_block(model):
    sae = make_sae("dataset", site="L0R")
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with model.hooks(["L0R", "L1RP"], sae_hooks(sae, model, mode="reconstruct")):
            model(tokens)
            stored, next_input = model.activations["L0R"], model.activations["L1RP"]
    # The stored L0R is the value before the SAE; block 1 receives decode(encode(it)).
    torch.testing.assert_close(next_input, sae.reconstruct(stored), rtol=0, atol=0)


def greedy(model, prompt, n, fns, use_cache):
    with model.hooks(None, fns):
        if use_cache:
            model.setup_cache(prompt.shape[0], prompt.shape[1] + n)
            logits = model(prompt, 0)
            seq, pos = prompt, prompt.shape[1]
            for _ in range(n):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
                logits = model(nxt, pos)
                pos += 1
            model.free_cache()
        else:
            seq = prompt
            for _ in range(n):
                nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
        return seq[:, prompt.shape[1]:]


def test_steering_with_and_without_kv_cache_gives_the_same_tokens(model):
    sae = make_sae("none", site="L0R")
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(2))
    # Large enough to change this random model's choices; row 1 stays unsteered.
    fns = sae_hooks(sae, model, edits=[Edit(7, "add", 40.0, rows=(0, 2)), Edit(11, "set", 30.0, rows=(2,))])
    with torch.no_grad():
        plain = greedy(model, prompt, 6, {}, use_cache=True)
        cached = greedy(model, prompt, 6, fns, use_cache=True)
        uncached = greedy(model, prompt, 6, fns, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[1], plain[1])
    assert not torch.equal(cached[0], plain[0]) or not torch.equal(cached[2], plain[2])


# ----------------------------------------------------------------------------- transcoders (site L{L}TC)
def test_transcoder_splice_replaces_the_mlp_and_steering_edits_its_output(model):
    tc = make_sae("dataset", site="L0TC")
    assert tc.cfg.is_transcoder
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))
    block = model.layers[0]
    with torch.no_grad():
        model.set_hooks(["L0TC"], None)  # a transcoder site stores both ends of the MLP
        model(tokens)
        mlp_in, mlp_out = model.activations["L0MI"], model.activations["L0M"]
        torch.testing.assert_close(block.feed_forward(mlp_in), mlp_out)
        # Reconstruct: block 0's MLP output becomes the transcoder's prediction from its input.
        model.set_hooks(["L0TC", "L0R"], sae_hooks(tc, model, mode="reconstruct"))
        model(tokens)
        resid_mid = model.activations["L0R"] - model.activations["L0M"]
        spliced_out = model.activations["L0R"] - resid_mid
        torch.testing.assert_close(spliced_out, tc.reconstruct(mlp_in), rtol=1e-5, atol=1e-5)
        # Steer: the MLP still runs; its output moves by decode(h') - decode(h), h the code of mlp_in.
        edits = [Edit(3, "add", 2.0, rows=(1,))]
        fn = steer_fn(tc, edits)
        assert fn.keeps_mlp
        model.set_hooks(["L1RP"], sae_hooks(tc, model, edits=edits))
        model(tokens)
        steered_next = model.activations["L1RP"]
        model.set_hooks(["L0RM", "L1RP"], None)
        model(tokens)
        clean_mid, clean_next = model.activations["L0RM"], model.activations["L1RP"]
    model.set_hooks(None, None)
    h = tc.encode(mlp_in)
    he = h.clone()
    he[1, :, 3] += 2.0
    delta = tc.decode(he) - tc.decode(h)
    torch.testing.assert_close(steered_next, clean_mid + mlp_out + delta, rtol=1e-5, atol=1e-5)
    assert torch.equal(steered_next[0], clean_next[0])  # row 0 has no edit: bit for bit


def test_transcoder_without_edits_leaves_the_mlp_alone(model):
    tc = make_sae("none", site="L1TC")
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        clean = model(tokens)
        with model.hooks(None, sae_hooks(tc, model)):
            same = model(tokens)
    assert torch.equal(clean, same)


def test_binding_a_dataset_normalised_sae_moves_its_shift_and_refuses_per_token_statistics(model):
    from sae import bind_to_model

    g = model.layers[1].ffn_norm.weight.detach().float()
    sae = make_sae("dataset", site="L1MI")
    sae.cfg = sae.cfg.replace(apply_b_pre_to_input=False, source={"input_before_norm_weight": "mlp_in"})
    x_tl = acts((4, 3), seed=7)  # what the SAE was trained on: the input before the norm weight
    with torch.no_grad():
        want_h, want = sae.encode(x_tl), sae.reconstruct(x_tl)
        bind_to_model(sae, model)
        # Our point is x_tl * g: the same code, and the reconstruction of our point (g times the old one).
        torch.testing.assert_close(sae.encode(x_tl * g), want_h, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae.reconstruct(x_tl * g), want * g, rtol=1e-4, atol=1e-5)
    per_token = make_sae("per_token", site="L1MI")
    per_token.cfg = per_token.cfg.replace(apply_b_pre_to_input=False, source={"input_before_norm_weight": "mlp_in"})
    with pytest.raises(ValueError, match="normalises each token"):
        bind_to_model(per_token, model)


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "batchtopk"])
@pytest.mark.parametrize("normalization", ["none", "dataset"])
def test_set_and_clamp_on_per_latent_architectures_use_only_the_edited_encoder_rows(activation, normalization):
    sae = make_sae(normalization, activation=activation)
    if activation == "batchtopk":
        sae.eval()  # inference: its learned threshold, a per-latent rule
    x = acts()
    h = sae.encode(x).reshape(-1, L)
    active = int(h.ne(0).sum(0).argmax())
    edits = [Edit(active, "set", 0.5, rows=(1,)), Edit(active, "clamp", max=0.01, rows=(0,)), Edit(40, "zero"),
             Edit(7, "add", 1.5)]
    calls = []
    real = sae.code_normalized
    sae.code_normalized = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]
    out = steer_fn(sae, edits)(x)
    assert calls == []  # no full encoder pass
    ref, h0, he = dense_reference(sae, x, edits)
    assert not torch.equal(h0, he)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_topk_set_edits_still_need_the_whole_code():
    sae = make_sae()
    calls = []
    real = sae.code_normalized
    sae.code_normalized = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]
    steer_fn(sae, [Edit(3, "set", 1.0)])(acts())
    assert calls == [1]  # a TopK latent's code depends on its rank among all latents
