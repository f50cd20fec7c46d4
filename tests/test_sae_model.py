"""SparseAutoencoder math against plain dense torch written here, gradients of the sparse paths, the
decoder-norm axis, init and input errors."""

import math

import pytest
import torch

from sae import SAEConfig, SparseAutoencoder, SparseCode, sparse_decode

D, L = 12, 40  # L != D so row and column norms of W_dec cannot be confused


def make(activation="topk", k=4, normalization="none", seed=0, **kw):
    cfg = SAEConfig(d_model=D, n_latents=L, architecture=activation, k=k, normalization=normalization, **kw)
    sae = SparseAutoencoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # move away from the symmetric init so every term is exercised
        sae.W_enc.add_(0.3 * torch.randn(L, D, generator=g))
        sae.W_dec.add_(0.3 * torch.randn(L, D, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(L, generator=g))
        sae.b_pre.copy_(0.5 * torch.randn(D, generator=g))
    return sae


def data(n=30, seed=1, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, D, generator=g) + 0.7


def ref_normalize(sae, x):
    """(x_n, shift, in_scale, out_scale) by the documented formulas."""
    c = sae.cfg
    if c.normalization == "per_token":
        mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        s = 1 / (std + c.norm_eps)
        return (x - mean) * s, mean, s, s
    if c.normalization == "dataset":
        return (x - sae.norm_shift) * sae.norm_in_scale, sae.norm_shift, sae.norm_in_scale, sae.norm_out_scale
    return x, 0.0, 1.0, 1.0


def ref_forward(sae, x, k=None, dead_mask=None, k_aux=0, aux_coeff=1 / 32, l1_coeff=0.0, batch=False):
    """Dense reference: returns (loss, mse, aux, h_dense, x_hat_raw)."""
    c = sae.cfg
    xn, shift, s_in, s_out = ref_normalize(sae, x)
    xc = xn - sae.b_pre if c.apply_b_pre_to_input else xn
    pre = xc @ sae.W_enc.T + sae.b_enc
    r = torch.relu(pre)
    if c.architecture in ("topk", "batchtopk"):
        k = c.k if k is None else k
        score = r * sae.W_dec.norm(dim=1) if c.rank_by_decoder_norm else r
        mask = torch.zeros_like(r, dtype=torch.bool)
        if c.architecture == "batchtopk" and batch:
            flat = score.detach().flatten()
            keep = flat.topk(k * x.shape[0]).indices
            mask.view(-1)[keep] = True
        elif c.architecture == "batchtopk":
            mask = pre > sae.threshold
        else:
            mask.scatter_(1, score.detach().topk(k, dim=1).indices, True)
        h = r * mask
    elif c.architecture == "jumprelu":
        h = r * (pre > sae.threshold)
    else:
        h = r
    x_hat_n = h @ sae.W_dec + sae.b_pre
    target = (x - shift) * s_out
    mse = (x_hat_n - target).pow(2).mean()
    aux = torch.zeros(())
    if dead_mask is not None and dead_mask.any():
        ka = min(k_aux, int(dead_mask.sum()))
        rd = r.masked_fill(~dead_mask, -1.0)
        idx = rd.detach().topk(ka, dim=1).indices
        h_aux = torch.zeros_like(r).scatter(1, idx, r.gather(1, idx))
        e = (target - x_hat_n).detach()
        aux = (h_aux @ sae.W_dec - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    l1 = (h * sae.W_dec.norm(dim=1)).sum(-1).mean() if c.architecture == "relu" else torch.zeros(())
    loss = mse + aux_coeff * aux + l1_coeff * l1
    x_hat = x_hat_n / s_out + shift
    return loss, mse, aux, h, x_hat


def grads(sae):
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def zero_grads(sae):
    for p in sae.parameters():
        p.grad = None


# ----------------------------------------------------------------------------- forward math
@pytest.mark.parametrize("activation,k", [("topk", 4), ("relu", None), ("jumprelu", None), ("batchtopk", 3)])
@pytest.mark.parametrize("normalization", ["none", "per_token", "dataset"])
def test_encode_decode_match_reference(activation, k, normalization):
    sae = make(activation, k, normalization)
    x = data()
    if normalization == "dataset":
        sae.fit_dataset_norm(x, center=True)
    if activation in ("jumprelu", "batchtopk"):
        sae.threshold.copy_(torch.rand(L, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        _, _, _, h_ref, x_hat_ref = ref_forward(sae, x)
        h = sae.encode(x)
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(h != 0, h_ref != 0)
        torch.testing.assert_close(sae.reconstruct(x), x_hat_ref, rtol=1e-5, atol=1e-5)
        stats = sae.norm_stats(x)
        torch.testing.assert_close(sae.decode(h, stats), x_hat_ref, rtol=1e-5, atol=1e-5)
        code = sae.encode(x, sparse=True)
        assert isinstance(code, SparseCode)
        torch.testing.assert_close(code.to_dense(L), h)


def test_topk_keeps_exactly_k_and_leading_dims():
    sae = make("topk", 5)
    x = data(24).reshape(2, 3, 4, D)
    h = sae.encode(x)
    assert h.shape == (2, 3, 4, L)
    assert ((h > 0).sum(-1) == 5).all()
    assert (h >= 0).all()
    assert sae.reconstruct(x).shape == x.shape
    assert sae.encode(x, sparse=True).values.shape == (2, 3, 4, 5)


def test_rank_by_decoder_norm_changes_the_choice():
    plain, ranked = make("topk", 3), make("topk", 3, rank_by_decoder_norm=True)
    with torch.no_grad():
        # Make half of the decoder rows long, so ranking by ||W_dec|| must prefer those latents.
        for sae in (plain, ranked):
            sae.W_dec[: L // 2] *= 10
    x = data()
    hp, hr = plain.encode(x), ranked.encode(x)
    assert not torch.equal(hp != 0, hr != 0)
    ref = ref_forward(ranked, x)[3]
    assert torch.equal(hr != 0, ref != 0)
    # A kept latent's value is still relu(pre), not the rank score.
    torch.testing.assert_close(hr, ref)


def test_k_override_and_errors():
    sae = make("topk", 4)
    x = data()
    assert ((sae.encode(x, k=7) > 0).sum(-1) == 7).all()
    with pytest.raises(ValueError, match="k=0"):
        sae.encode(x, k=0)
    with pytest.raises(ValueError, match="d_model=12"):
        sae.encode(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="floating-point"):
        sae.encode(torch.ones(3, D, dtype=torch.long))
    relu = make("relu", None)
    with pytest.raises(ValueError, match="k applies"):
        relu.encode(x, k=3)
    with pytest.raises(ValueError, match="aux-k"):
        relu(x, dead_mask=torch.ones(L, dtype=torch.bool))


def test_per_token_decode_needs_stats():
    sae = make("topk", 4, "per_token")
    x = data()
    with pytest.raises(ValueError, match="norm_stats"):
        sae.decode(sae.encode(x))


def test_decode_of_edited_dense_code_and_bf16():
    sae = make("topk", 4)
    x = data()
    h = sae.encode(x).detach()
    h[:, 0] = -2.5  # decode is linear in h; negative entries are allowed
    torch.testing.assert_close(sae.decode(h), (h @ sae.W_dec + sae.b_pre).detach())
    bf = SparseAutoencoder(sae.cfg.replace(dtype="bfloat16"), seed=None)
    bf.load_state_dict({k: v.to(torch.bfloat16) for k, v in sae.state_dict().items()})
    out = bf.reconstruct(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # bf16 rounding may swap a latent near the k-th place; compare the tokens that chose the same set.
    same = ((bf.encode(x.to(torch.bfloat16)) != 0) == (sae.encode(x) != 0)).all(-1)
    assert same.float().mean() > 0.7
    torch.testing.assert_close(out.float()[same], sae.reconstruct(x).detach()[same], rtol=0.05, atol=0.1)


# ----------------------------------------------------------------------------- sparse paths vs dense
@pytest.mark.parametrize("normalization", ["none", "per_token", "dataset"])
def test_topk_loss_and_grads_equal_dense(normalization):
    sae = make("topk", 4, normalization)
    x = data()
    if normalization == "dataset":
        sae.fit_dataset_norm(x)
    dead = torch.zeros(L, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead, k_aux=6, aux_coeff=0.25)
    out.loss.backward()
    ours = grads(sae)
    zero_grads(sae)
    loss, mse, aux, _, x_hat = ref_forward(sae, x, dead_mask=dead, k_aux=6, aux_coeff=0.25)
    loss.backward()
    ref = grads(sae)
    torch.testing.assert_close(out.mse, mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.aux_loss, aux, rtol=1e-5, atol=1e-7)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.x_hat, x_hat.detach(), rtol=1e-5, atol=1e-5)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_batchtopk_training_loss_grads_and_threshold():
    sae = make("batchtopk", 3)
    sae.train()
    x = data(20)
    out = sae(x)
    out.loss.backward()
    ours = grads(sae)
    zero_grads(sae)
    loss, mse, _, h_ref, _ = ref_forward(sae, x, batch=True)
    loss.backward()
    torch.testing.assert_close(out.mse, mse, rtol=1e-5, atol=1e-7)
    assert (out.code.values > 0).sum() == 3 * 20  # k per token on average over the batch
    assert (out.code.values > 0).sum(-1).float().std() > 0  # ... but not per token
    for name, g in grads(sae).items():
        torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # The inference threshold is the smallest kept activation of the (first) batch.
    kept = h_ref[h_ref > 0]
    torch.testing.assert_close(sae.threshold, torch.full((L,), float(kept.detach().min())))
    sae.eval()
    h = sae.encode(x)
    assert torch.equal(h > 0, ref_forward(sae, x)[3] > 0)


@pytest.mark.parametrize("bias", [0.5, -50.0])  # many active (dense regime) / few active (sparse gather)
def test_relu_l1_loss_and_grads_equal_dense(bias):
    sae = make("relu", None, decoder_unit_norm=False)
    with torch.no_grad():
        sae.b_enc.fill_(bias)
        sae.b_enc[:2] = 0.5  # at most two latents can fire when the others are pushed far below 0
    x = data()
    out = sae(x, l1_coeff=0.01)
    out.loss.backward()
    ours = grads(sae)
    zero_grads(sae)
    loss, mse, _, h, _ = ref_forward(sae, x, l1_coeff=0.01)
    loss.backward()
    m = out.code.values.shape[-1]
    assert (m > L / 16) == (bias > 0), "test meant to cover both the dense and the sparse regime"
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.l1, (h * sae.W_dec.norm(dim=1)).sum(-1).mean(), rtol=1e-5, atol=1e-7)
    for name, g in grads(sae).items():
        torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_wrt_input_flows_through_sparse_encode():
    sae = make("topk", 4)
    x = data(6).requires_grad_()
    sae.encode(x).pow(2).sum().backward()
    g_ours = x.grad.clone()
    x.grad = None
    ref_forward(sae, x)[3].pow(2).sum().backward()
    torch.testing.assert_close(g_ours, x.grad, rtol=1e-5, atol=1e-6)


def test_sparse_decode_matches_dense_and_handles_padding():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(L, D, generator=g, requires_grad=True)
    idx = torch.randint(0, L, (7, 3), generator=g)
    idx[:, 2] = idx[:, 0]  # a repeated index ("padding" slot pointing at an active latent)
    vals = torch.rand(7, 3, generator=g)
    vals[:, 2] = 0
    vals.requires_grad_()
    out = sparse_decode(vals, idx, W)
    dense = torch.zeros(7, L).scatter_add(1, idx, vals)
    ref = dense @ W
    torch.testing.assert_close(out, ref)
    gy = torch.randn(7, D, generator=g)
    gw, gv = torch.autograd.grad(out, (W, vals), gy)
    rw, rv = torch.autograd.grad(ref, (W, vals), gy)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gv, rv)
    with pytest.raises(ValueError, match=r"\[N, m\]"):
        sparse_decode(vals[0], idx[0], W)


# ----------------------------------------------------------------------------- decoder norm: the axis
def test_decoder_unit_norm_is_per_latent():
    sae = make("topk", 4)
    sae.normalize_decoder_()
    # Each latent's decoder vector is what decoding that latent alone adds: it must have norm 1.
    one_hot = torch.eye(L)
    vectors = sae.decode(one_hot) - sae.decode(torch.zeros(1, L))
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(L))
    # The seed normalised the other axis; with L != D that is not the same thing.
    assert not torch.allclose(sae.W_dec.norm(dim=0), torch.ones(D), atol=1e-2)


def test_gradient_projection_is_orthogonal_per_latent():
    sae = make("topk", 4)
    sae.normalize_decoder_()
    x = data()
    sae(x).loss.backward()
    before = sae.W_dec.grad.clone()
    sae.project_decoder_grad_()
    after = sae.W_dec.grad
    w = sae.W_dec.detach()
    # Orthogonal to each latent's own vector...
    torch.testing.assert_close((after * w).sum(1), torch.zeros(L), atol=1e-6, rtol=0)
    # ...and the removed part is parallel to it (nothing else changed).
    removed = before - after
    coef = (before * w).sum(1, keepdim=True)
    torch.testing.assert_close(removed, coef * w, rtol=1e-5, atol=1e-7)
    assert removed.abs().max() > 1e-4


def test_optimizer_step_with_projection_keeps_norms_close_and_renorm_restores():
    sae = make("topk", 4)
    sae.normalize_decoder_()
    opt = torch.optim.SGD(sae.parameters(), lr=1e-2)
    x = data()
    sae(x).loss.backward()
    sae.project_decoder_grad_()
    opt.step()
    norms = sae.W_dec.norm(dim=1)
    # A tangent step of size eps changes the norm only at second order.
    assert (norms - 1).abs().max() < 1e-3
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(L))


# ----------------------------------------------------------------------------- init and statistics
def test_orthogonal_init_decoder_equals_encoder_transpose():
    cfg = SAEConfig(d_model=16, n_latents=8, k=2)
    sae = SparseAutoencoder(cfg, seed=3)
    assert torch.equal(sae.W_enc, sae.W_dec)  # both row-per-latent: encoder = decoder^T
    torch.testing.assert_close(sae.W_dec @ sae.W_dec.T, torch.eye(8), atol=1e-5, rtol=0)
    wide = SparseAutoencoder(SAEConfig(d_model=8, n_latents=32, k=2), seed=3)
    torch.testing.assert_close(wide.W_dec.norm(dim=1), torch.ones(32))
    again = SparseAutoencoder(SAEConfig(d_model=8, n_latents=32, k=2), seed=3)
    assert torch.equal(wide.W_dec, again.W_dec)
    other = SparseAutoencoder(SAEConfig(d_model=8, n_latents=32, k=2), seed=4)
    assert not torch.equal(wide.W_dec, other.W_dec)


def test_init_b_pre_uses_the_normalised_space():
    x = data(50) * 5 + 3
    sae = make("topk", 4, "per_token")
    sae.init_b_pre_([x[:20], x[20:]])
    ref = ref_normalize(sae, x)[0].mean(0)
    torch.testing.assert_close(sae.b_pre.detach(), ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sae.b_pre.detach(), x.mean(0), atol=0.1)  # the seed's bug would pass this


def test_fit_dataset_norm_llama_scope_convention():
    x = data(40)
    sae = make("topk", 4, "dataset")
    sae.fit_dataset_norm(x)
    avg = x.double().norm(dim=1).mean()
    torch.testing.assert_close(sae.norm_in_scale.double(), math.sqrt(D) / avg)
    assert torch.equal(sae.norm_shift, torch.zeros(D))
    xn = sae.normalize(x)[0]
    torch.testing.assert_close(xn.norm(dim=1).mean(), torch.tensor(math.sqrt(D)), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="iterator"):
        sae.fit_dataset_norm(iter([x]), center=True)
    with pytest.raises(ValueError, match="normalization='dataset'"):
        make("topk", 4).fit_dataset_norm(x)


def test_config_validation():
    with pytest.raises(ValueError, match="k=50 exceeds"):
        SAEConfig(d_model=4, n_latents=8, k=50)
    with pytest.raises(ValueError, match="needs a positive int k"):
        SAEConfig(d_model=4, n_latents=8, k=None)
    with pytest.raises(ValueError, match="no meaning"):
        SAEConfig(d_model=4, n_latents=8, architecture="relu", k=3)
    with pytest.raises(ValueError, match="architecture='gelu'"):
        SAEConfig(d_model=4, n_latents=8, architecture="gelu")
    assert SAEConfig(d_model=4, n_latents=8, k=2, site="L3.mlp").site == "L3TC"  # a transcoder of block 3's MLP
    assert SAEConfig(d_model=4, n_latents=8, k=2, site="L3TC").is_transcoder
    assert not SAEConfig(d_model=4, n_latents=8, k=2, site="L3M").is_transcoder
    with pytest.raises(ValueError, match="cannot parse hook site"):
        SAEConfig(d_model=4, n_latents=8, site="layer three")
    assert SAEConfig(d_model=4, n_latents=8, k=2, site="L3.resid_post").site == "L3R"
    assert SAEConfig(d_model=4, n_latents=8, k=2, site=7).site == "L7R"


@pytest.mark.parametrize("activation,k", [("topk", 4), ("jumprelu", None)])
def test_inference_encodes_in_chunks_with_the_same_result(monkeypatch, activation, k):
    import sae.model as model_module

    sae = make(activation, k)
    if activation == "jumprelu":
        sae.threshold.copy_(torch.rand(L, generator=torch.Generator().manual_seed(3)))
    x = data(50)
    with torch.no_grad():
        whole_h, whole_x = sae.encode(x), sae.reconstruct(x)
        monkeypatch.setattr(model_module, "INFER_CHUNK_ELEMENTS", 7 * L)  # 8 chunks of 7 tokens
        code = sae.encode(x, sparse=True)
        # BLAS may round a chunk's matmul differently; the choice of latents must not change.
        torch.testing.assert_close(code.to_dense(L), whole_h, rtol=1e-6, atol=1e-6)
        assert torch.equal(sae.encode(x) != 0, whole_h != 0)
        torch.testing.assert_close(sae.reconstruct(x), whole_x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "batchtopk", "relu"])
def test_folding_decoder_norms_keeps_the_function(activation):
    k = 4 if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=48, architecture=activation, k=k, normalization="dataset",
                                      rank_by_decoder_norm=activation == "topk"), seed=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1, generator=g) * 2 + 0.3)
        sae.b_enc.copy_(torch.randn(48, generator=g) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(48, generator=g) * 0.2)
    sae.set_dataset_norm(3.0, 2.0)
    sae.eval()
    x = torch.randn(64, D, generator=g) * 2
    before = sae.reconstruct(x)
    active = sae.encode(x) > 0
    sae.fold_decoder_norms_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48), rtol=1e-5, atol=1e-5)
    assert torch.equal(sae.encode(x) > 0, active)
    torch.testing.assert_close(sae.reconstruct(x), before, rtol=1e-4, atol=1e-5)


def test_batchtopk_refuses_k_at_inference_with_a_clear_reason():
    sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=L, architecture="batchtopk", k=4), seed=0).eval()
    with pytest.raises(ValueError, match="learned threshold at inference"):
        sae.encode(torch.randn(3, D), k=2)


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 100, 1])
def test_project_rows_chunked_equals_the_whole_matrix_formula(monkeypatch, chunk_bytes):
    import sae.model as model_mod

    monkeypatch.setattr(model_mod, "PROJECT_CHUNK_BYTES", chunk_bytes)  # 100 bytes: 2 rows of 12 floats per chunk
    g0 = torch.Generator().manual_seed(3)
    g, w = torch.randn(L, D, generator=g0), 2.0 * torch.randn(L, D, generator=g0)  # rows far from unit norm
    expected = g - ((g * w).sum(1) / (w * w).sum(1))[:, None] * w
    got = g.clone()
    model_mod.project_rows_(got, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bf16_selection_keeps_fp32_values_and_gradients():
    # 256 latents, k=4: the sparse path (with 40 latents k=4 is past DENSE_FRACTION and recomputes densely).
    n = 256
    sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=n, k=4, normalization="none"), seed=0)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(n, D, generator=torch.Generator().manual_seed(5)))
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=torch.Generator().manual_seed(6)))
    x = data()
    out = sae(x, select_dtype=torch.bfloat16)
    idx = out.code.indices
    xc = sae.normalize(x)[0] - sae.b_pre
    with torch.no_grad():
        pre32 = xc @ sae.W_enc.t() + sae.b_enc
        pre16 = torch.addmm(sae.b_enc.bfloat16(), xc.bfloat16(), sae.W_enc.bfloat16().t()).relu()
    # The latents are the bf16 top-k (ties aside: compare the kept bf16 values with the k-th largest)...
    kth = pre16.topk(4, dim=1).values[:, -1:]
    assert (pre16.gather(1, idx) >= kth).all()
    # ...and their values are the exact fp32 pre-activations (bf16 has 8 bits: 0.4% apart at best).
    torch.testing.assert_close(out.code.values, pre32.gather(1, idx).relu(), rtol=1e-6, atol=1e-6)
    # Gradients equal an fp32 step that keeps the same latents: the dense reference on that code.
    out.loss.backward()
    ours = grads(sae)
    zero_grads(sae)
    xn = sae.normalize(x)[0]
    h = torch.zeros(x.shape[0], n).scatter(1, idx, (((xn - sae.b_pre) @ sae.W_enc.t() + sae.b_enc).gather(1, idx)).relu())
    ((h @ sae.W_dec + sae.b_pre - xn) ** 2).mean().backward()
    ref = grads(sae)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
