"""sae.metrics against numpy and hand-spliced llama3 forwards."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_random_model, tiny_args

from sae import SAEConfig, SparseAutoencoder, SparseCode
from sae import metrics

D, L = 64, 128


def make_sae(site="L0R"):
    sae = SparseAutoencoder(SAEConfig(d_model=D, n_latents=L, k=6, site=site), seed=0)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(L, generator=torch.Generator().manual_seed(1)) - 0.2)
    return sae


def test_reconstruction_metrics_match_numpy():
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(50, D, generator=g), torch.randn(50, D, generator=g) * 0.3
    x_hat = x * 0.8 + x_hat
    xn, hn = x.numpy().astype(np.float64), x_hat.numpy().astype(np.float64)
    ev = 1 - ((xn - hn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert metrics.explained_variance(x, x_hat) == pytest.approx(ev, rel=1e-9)
    assert metrics.fvu(x, x_hat) == pytest.approx(1 - ev, rel=1e-9)
    assert metrics.mse(x, x_hat) == pytest.approx(((xn - hn) ** 2).mean(), rel=1e-9)
    h = torch.zeros(4, L)
    h[0, :3] = 1
    h[1, :5] = 2
    assert metrics.l0(h) == 2.0
    assert metrics.l0(SparseCode(torch.tensor([[1.0, 0.0]]), torch.tensor([[3, 0]]))) == 1.0
    with pytest.raises(ValueError, match="without variance"):
        metrics.explained_variance(torch.ones(3, D), torch.zeros(3, D))


def test_latent_stats_and_histogram():
    sae = make_sae()
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(2))
    stats = metrics.LatentStats(L)
    for part in x.split(100):
        stats.update(sae.encode(part, sparse=True))
    h = sae.encode(x)
    fires = (h > 0).sum(0)
    assert torch.equal(stats.fires, fires)
    assert stats.n_tokens == 300
    torch.testing.assert_close(stats.activation_sum, h.double().sum(0), rtol=1e-6, atol=1e-6)
    assert stats.dead_fraction() == pytest.approx(float((fires == 0).float().mean()))
    assert stats.dense_fraction(0.05) == pytest.approx(float((fires / 300 > 0.05).float().mean()))
    hist = stats.histogram(bins=8, low=-3, high=0)
    assert sum(hist["counts"]) == int((fires > 0).sum()) and hist["dead"] == int((fires == 0).sum())
    assert len(hist["edges"]) == 9
    dens = fires[fires > 0].double() / 300
    expected = np.histogram(np.log10(dens.numpy()), bins=8, range=(-3, 0))[0]
    assert hist["counts"] == expected.tolist()


def test_evaluate_reconstruction_streams_like_one_batch():
    sae = make_sae()
    x = torch.randn(240, D, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    report = metrics.evaluate_reconstruction(sae, list(x.split(70)))
    with torch.no_grad():
        x_hat = sae.reconstruct(x)
        h = sae.encode(x)
    assert report.n_tokens == 240
    assert report.l0 == pytest.approx(metrics.l0(h))
    assert report.mse == pytest.approx(metrics.mse(x, x_hat), rel=1e-6)
    assert report.explained_variance == pytest.approx(metrics.explained_variance(x, x_hat), rel=1e-6)
    assert report.fvu == pytest.approx(1 - report.explained_variance)
    assert set(report.as_dict()) >= {"l0", "mse", "explained_variance", "fvu", "dead_fraction", "dense_fraction"}


def ce(logits, tokens):
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))


def test_downstream_loss_and_fidelity_match_hand_splices():
    model = make_random_model(tiny_args(vocab_size=256), seed=4, std=0.1)
    sae = make_sae("L0R")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    keep = {(1, "attn_out"): lambda x: x * 1.0}  # another hook the caller had: must survive
    model.set_hooks(["L1R"], keep)
    with torch.no_grad():
        clean = ce(model(tokens), tokens)
        model.set_hooks(["L1R"], {**keep, (0, "resid_post"): sae.reconstruct})
        with_sae = ce(model(tokens), tokens)
        model.set_hooks(["L1R"], {**keep, (0, "resid_post"): torch.zeros_like})
        zero = ce(model(tokens), tokens)
        model.set_hooks(["L1R"], keep)
        out = metrics.downstream_loss(model, sae, tokens)
    assert out["clean_loss"] == pytest.approx(clean, rel=1e-6)
    assert out["sae_loss"] == pytest.approx(with_sae, rel=1e-6)
    assert out["zero_ablation_loss"] == pytest.approx(zero, rel=1e-6)
    assert out["delta_lm_loss"] == pytest.approx(with_sae - clean, rel=1e-5, abs=1e-7)
    assert out["fidelity"] == pytest.approx((with_sae - clean) / (zero - clean), rel=1e-5)
    assert out["loss_recovered"] == pytest.approx(1 - out["fidelity"])
    assert with_sae != clean and zero != clean
    assert list(model.sae_fns) == [(1, "attn_out")] and model.store_sites == ((1, "resid_post"),)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, :8] = False
    masked = metrics.lm_loss(model, tokens, mask)
    with torch.no_grad():
        logits = model(tokens)
    per = F.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1), reduction="none").view(2, 15)
    assert masked == pytest.approx(float(per[:, 7:].mean()), rel=1e-6)
    model.set_hooks(None, None)
    assert math.isfinite(out["fidelity"])
