"""Dead-latent tracking (also under DDP), k-annealing, TopK -> JumpReLU conversion, a short training run."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from sae import DeadLatentTracker, KSchedule, SAEConfig, SparseAutoencoder, topk_to_jumprelu


def test_tracker_counts_tokens_since_last_fire():
    t = DeadLatentTracker(4, dead_after_tokens=100)
    t.update(torch.tensor([True, False, False, False]), n_tokens=60)
    t.update(torch.tensor([False, True, False, False]), n_tokens=60)
    assert t.tokens_since_fired.tolist() == [60, 0, 120, 120]
    assert t.dead_mask.tolist() == [False, False, True, True]
    assert t.dead_fraction == 0.5
    state = t.state_dict()
    u = DeadLatentTracker(4)
    u.load_state_dict(state)
    assert torch.equal(u.tokens_since_fired, t.tokens_since_fired) and u.dead_after_tokens == 100
    with pytest.raises(ValueError, match="bool tensor"):
        t.update(torch.ones(3, dtype=torch.bool), 1)


def test_k_schedule():
    s = KSchedule(k=32, k_start=512, anneal_steps=100)
    assert s(0) == 512 and s(100) == 32 and s(10_000) == 32
    assert s(50) == 272
    values = [s(i) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    e = KSchedule(k=32, k_start=512, anneal_steps=100, shape="exponential")
    assert e(50) == 128  # geometric midpoint
    assert KSchedule(k=8, k_start=8, anneal_steps=0)(0) == 8
    with pytest.raises(ValueError, match="k <= k_start"):
        KSchedule(k=64, k_start=32, anneal_steps=10)


def test_forward_uses_the_scheduled_k():
    sae = SparseAutoencoder(SAEConfig(d_model=8, n_latents=32, k=2))
    out = sae(torch.randn(5, 8), k=KSchedule(k=2, k_start=10, anneal_steps=4)(0))
    assert out.code.values.shape == (5, 10)


def test_aux_loss_without_dead_latents_is_zero_and_one_dead_latent_counts():
    sae = SparseAutoencoder(SAEConfig(d_model=8, n_latents=32, k=2))
    x = torch.randn(16, 8)
    assert sae(x, dead_mask=torch.zeros(32, dtype=torch.bool)).aux_loss == 0
    one = torch.zeros(32, dtype=torch.bool)
    one[7] = True  # the seed trained dead latents only once >= k_aux of them were dead
    out = sae(x, dead_mask=one, k_aux=16)
    assert out.aux_loss > 0
    out.loss.backward()
    assert sae.W_dec.grad[7].abs().sum() > 0


def test_topk_to_jumprelu_keeps_l0_and_firing_counts():
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_model=16, n_latents=64, k=6), seed=1)
    with torch.no_grad():
        sae.W_enc.add_(0.2 * torch.randn(64, 16, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(64, generator=g))
    x = torch.randn(600, 16, generator=g)
    jr = topk_to_jumprelu(sae, [x[:300], x[300:]])
    assert jr.cfg.architecture == "jumprelu" and jr.cfg.k is None
    h_topk, h_jr = sae.encode(x), jr.encode(x)
    counts_topk, counts_jr = (h_topk > 0).sum(0), (h_jr > 0).sum(0)
    assert (counts_topk - counts_jr).abs().max() <= 1
    l0 = (h_jr > 0).sum(-1).float().mean()
    assert abs(float(l0) - 6) < 0.05
    assert (jr.threshold >= 0).all()
    # Where JumpReLU fires, the value is the pre-activation itself.
    pre = sae.preactivations(x)
    torch.testing.assert_close(h_jr[h_jr > 0], pre[h_jr > 0])
    with pytest.raises(ValueError, match="converts a topk SAE"):
        topk_to_jumprelu(jr, x)


def test_short_training_run_learns_a_sparse_dictionary():
    g = torch.Generator().manual_seed(0)
    d, n_true, L = 16, 24, 48
    truth = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    coeffs = torch.rand(2048, n_true, generator=g) * (torch.rand(2048, n_true, generator=g) < 0.1)
    x = coeffs @ truth + 0.5
    sae = SparseAutoencoder(SAEConfig(d_model=d, n_latents=L, k=4), seed=0)
    sae.init_b_pre_(x)
    opt = torch.optim.AdamW(sae.parameters(), lr=3e-3)
    tracker = DeadLatentTracker(L, dead_after_tokens=1024)
    first = None
    for step in range(40):
        batch = x[(step * 128) % 2048:][:128]
        out = sae(batch, dead_mask=tracker.dead_mask, k_aux=8)
        opt.zero_grad()
        out.loss.backward()
        sae.project_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
        tracker.update(out.fired, out.n_tokens)
        first = float(out.mse.detach()) if first is None else first
    assert float(out.mse.detach()) < 0.5 * first
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(L))


# ----------------------------------------------------------------------------- DDP (gloo, 2 processes)
def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    done = False
    try:
        torch.manual_seed(0)
        x = torch.randn(2 * 12, 8)
        dead = torch.zeros(32, dtype=torch.bool)
        dead[::4] = True
        sae = SparseAutoencoder(SAEConfig(d_model=8, n_latents=32, k=3), seed=2)
        model = DDP(sae)
        out = model(x[rank * 12:(rank + 1) * 12], dead_mask=dead, k_aux=4)
        out.loss.backward()
        tracker = DeadLatentTracker(32, dead_after_tokens=10)
        fired = torch.zeros(32, dtype=torch.bool)
        fired[rank] = True  # latent 0 fires on rank 0 only, latent 1 on rank 1 only
        tracker.update(fired, n_tokens=24)
        tracker.all_reduce_()
        if rank == 0:
            torch.save({"grads": {n: p.grad for n, p in sae.named_parameters()},
                        "since": tracker.tokens_since_fired}, out_file)
        dist.barrier()  # both ranks done before either tears gloo down
        done = True
    finally:
        dist.destroy_process_group()
    if done:
        # Skip the C++ teardown at interpreter exit: on a loaded machine gloo's threads can abort the process
        # there ("terminate called without an active exception") after all the work is saved.
        os._exit(0)


def test_ddp_forward_averages_sparse_grads_and_tracker_reduces_with_min(tmp_path):
    out_file = tmp_path / "rank0.pt"
    # spawn, not fork: forking after OpenMP regions have run can hang the children.
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    got = torch.load(out_file, weights_only=True)
    torch.manual_seed(0)
    x = torch.randn(2 * 12, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::4] = True
    sae = SparseAutoencoder(SAEConfig(d_model=8, n_latents=32, k=3), seed=2)
    total = {n: torch.zeros_like(p) for n, p in sae.named_parameters()}
    for r in range(2):
        sae.zero_grad()
        sae(x[r * 12:(r + 1) * 12], dead_mask=dead, k_aux=4).loss.backward()
        for n, p in sae.named_parameters():
            total[n] += p.grad / 2
    for n, g in total.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-5, atol=1e-7, msg=n)
    since = got["since"]
    assert since[0] == 0 and since[1] == 0 and (since[2:] == 24).all()
