"""One SAE training step, this project's TopK SAE against a plain dense TopK implementation, in one run.

A step is: forward, loss, backward, decoder gradient projection, AdamW step, decoder renormalisation.
The dense peer is what the seed did: TopK scattered into a dense [batch, n_latents] code, decoded by an
``nn.Linear``, with autograd through ``topk``. Both start from the same weights (the first losses are
printed side by side as a check), use the same optimizer settings, and are timed alternately so that
background load hits both alike; the table reports the median and the minimum of the timed steps, and
the encoder matmul alone (the floor any TopK SAE step pays).

    python benchmarks/bench_sae_step.py                       # d=2048, 32768 latents, k=64, batch 4096, fp32 CPU
    python benchmarks/bench_sae_step.py --d-model 512 --n-latents 8192 --batch 1024 --steps 3   # quick
    python benchmarks/bench_sae_step.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from sae import SAEConfig, SparseAutoencoder  # noqa: E402


@dataclass
class Options:
    d_model: int
    n_latents: int
    k: int
    batch: int
    steps: int
    warmup: int
    device: str
    threads: int | None
    seed: int
    adamw: str
    bf16: bool = False
    profile: bool = False


class DenseTopKSAE(nn.Module):
    """The seed's layout: decoder is nn.Linear(n_latents, d) whose weight is [d, n_latents], so one
    latent's decoder vector is a column."""

    def __init__(self, d_model: int, n_latents: int, k: int):
        super().__init__()
        self.k = k
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        self.encoder = nn.Linear(d_model, n_latents)
        self.decoder = nn.Linear(n_latents, d_model, bias=False)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.encoder(x - self.b_pre))
        top = pre.topk(self.k, dim=-1)
        h = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        x_hat = self.decoder(h) + self.b_pre
        return (x_hat - x).pow(2).mean()

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        w, g = self.decoder.weight, self.decoder.weight.grad  # [d, L]: per latent = per column
        coef = torch.linalg.vecdot(g, w, dim=0) / torch.linalg.vecdot(w, w, dim=0)
        g.addcmul_(w, coef[None, :], value=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.decoder.weight /= self.decoder.weight.norm(dim=0, keepdim=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def adamw(params, impl: str) -> torch.optim.Optimizer:
    # The seed's optimizer settings; the same for both implementations.
    return torch.optim.AdamW(params, lr=5e-5, betas=(0.85, 0.9999), eps=6.25e-10, **{impl: True})


def build(opt: Options):
    ours = SparseAutoencoder(SAEConfig(d_model=opt.d_model, n_latents=opt.n_latents, k=opt.k), seed=opt.seed,
                             device=opt.device)
    dense = DenseTopKSAE(opt.d_model, opt.n_latents, opt.k).to(opt.device)
    with torch.no_grad():
        dense.encoder.weight.copy_(ours.W_enc)
        dense.encoder.bias.copy_(ours.b_enc)
        dense.decoder.weight.copy_(ours.W_dec.t())
        dense.b_pre.copy_(ours.b_pre)
    return ours, dense


def step_ours(sae: SparseAutoencoder, optim: torch.optim.Optimizer, x: torch.Tensor,
              select_dtype: torch.dtype | None = None) -> float:
    out = sae(x, select_dtype=select_dtype)
    optim.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.project_decoder_grad_()
    optim.step()
    sae.normalize_decoder_()
    return float(out.loss.detach())


def step_dense(sae: DenseTopKSAE, optim: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = sae.loss(x)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    sae.project_decoder_grad_()
    optim.step()
    sae.normalize_decoder_()
    return float(loss.detach())


def timed(fn, device: str) -> tuple[float, float]:
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - t0, value


def run(opt: Options) -> None:
    if opt.threads:
        torch.set_num_threads(opt.threads)
    g = torch.Generator().manual_seed(opt.seed + 1)
    x = (torch.randn(opt.batch, opt.d_model, generator=g) * 2 + 0.5).to(opt.device)
    ours, dense = build(opt)
    opt_ours, opt_dense = adamw(ours.parameters(), opt.adamw), adamw(dense.parameters(), opt.adamw)

    contenders = {"ours (sparse)": lambda: step_ours(ours, opt_ours, x),
                  "dense TopK": lambda: step_dense(dense, opt_dense, x)}
    if opt.bf16:
        ours16 = build(opt)[0]
        opt16 = adamw(ours16.parameters(), opt.adamw)
        contenders["ours, bf16 selection (--bf16)"] = lambda: step_ours(ours16, opt16, x, torch.bfloat16)
    times: dict[str, list[float]] = {n: [] for n in contenders}
    first_losses = None
    for i in range(opt.warmup + opt.steps):
        # Alternate which goes first so drift in background load does not favour either.
        order = list(contenders.items())
        if i % 2:
            order.reverse()
        losses, took = {}, {}
        for name, fn in order:
            took[name], losses[name] = timed(fn, opt.device)
            if i >= opt.warmup:
                times[name].append(took[name])
        if first_losses is None:
            first_losses = losses
        print(f"step {i}{' (warmup)' if i < opt.warmup else ''}: "
              + ", ".join(f"{n} {took[n]:.3f}s loss {losses[n]:.6f}" for n in losses), flush=True)

    with torch.no_grad():
        floor = []
        for _ in range(max(3, opt.steps)):
            t, _ = timed(lambda: torch.addmm(ours.b_enc, x, ours.W_enc.t()), opt.device)
            floor.append(t)

    med = {n: statistics.median(v) for n, v in times.items()}
    device_name = torch.cuda.get_device_name() if opt.device.startswith("cuda") else machine.cpu_name()
    print()
    print(machine.banner())
    print(f"SAE training step, d_model={opt.d_model}, n_latents={opt.n_latents}, k={opt.k}, batch={opt.batch}, "
          f"fp32, device={opt.device} ({device_name}), torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"{opt.adamw} AdamW, {opt.steps} timed steps after {opt.warmup} warmup, {time.strftime('%Y-%m-%d')}")
    print(f"first-step losses (same init): ours {first_losses['ours (sparse)']:.6f}, "
          f"dense {first_losses['dense TopK']:.6f}")
    print()
    best = {n: min(v) for n, v in times.items()}
    print("| implementation | median step (s) | min step (s) | speedup vs dense (median) | speedup vs dense (min) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in times:
        print(f"| {name} | {med[name]:.3f} | {best[name]:.3f} | {med['dense TopK'] / med[name]:.2f}x | "
              f"{best['dense TopK'] / best[name]:.2f}x |")
    print(f"| encoder matmul alone (floor) | {statistics.median(floor):.3f} | {min(floor):.3f} | | |")
    print()
    print(f"ours / floor (median): {med['ours (sparse)'] / statistics.median(floor):.2f}x")
    if opt.profile:
        where_the_time_goes(ours, opt_ours, x)


# Profiler op names -> the phase of the step they belong to (the rest is "other").
PHASES = {"aten::addmm": "encoder matmul", "aten::mm": "encoder matmul", "aten::topk": "TopK selection",
          "aten::_embedding_bag": "sparse decode + encoder-row gathers",
          "aten::_embedding_bag_dense_backward": "sparse backward (dense W_enc/W_dec gradients)",
          "aten::_embedding_bag_per_sample_weights_backward": "sparse backward (code gradients)",
          "aten::linalg_vecdot": "decoder gradient projection", "aten::addcmul_": "decoder gradient projection",
          "aten::_fused_adamw_": "AdamW", "aten::linalg_vector_norm": "decoder renorm", "aten::div_": "decoder renorm",
          "aten::fill_": "zero fills (gradients, buffers)", "aten::zero_": "zero fills (gradients, buffers)",
          "aten::copy_": "copies (the addmm bias broadcast)"}


def where_the_time_goes(sae: SparseAutoencoder, optim: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One more step of ours under the torch profiler, self time grouped by phase."""
    from torch.profiler import profile

    with profile() as prof:
        step_ours(sae, optim, x)
    phases: dict[str, float] = {}
    for ev in prof.key_averages():
        phase = PHASES.get(ev.key, "other")
        phases[phase] = phases.get(phase, 0.0) + ev.self_cpu_time_total / 1e6
    total = sum(phases.values())
    print("\n| phase of our step | self time (s) | share |\n| --- | ---: | ---: |")
    for phase, t in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"| {phase} | {t:.3f} | {t / total:.0%} |")


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=2048, help="activation width (default 2048)")
    p.add_argument("--n-latents", type=int, default=32768, help="dictionary size (default 32768)")
    p.add_argument("--k", type=int, default=64, help="active latents per token (default 64)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step (default 4096)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adamw", choices=("fused", "foreach"), default="fused",
                   help="AdamW implementation, the same for both (default fused; foreach is torch's default)")
    p.add_argument("--bf16", action="store_true",
                   help="also time ours with the latent-selecting encoder matmul in bfloat16 (training's --bf16)")
    p.add_argument("--profile", action="store_true", help="after the timing, where our step's time goes, by phase")
    a = p.parse_args(argv)
    if min(a.d_model, a.n_latents, a.k, a.batch, a.steps) <= 0 or a.warmup < 0:
        p.error("sizes and --steps must be positive, --warmup non-negative")
    if a.k > a.n_latents:
        p.error(f"--k {a.k} exceeds --n-latents {a.n_latents}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but CUDA is not available")
    return Options(a.d_model, a.n_latents, a.k, a.batch, a.steps, a.warmup, a.device, a.threads, a.seed, a.adamw,
                   a.bf16, a.profile)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run(parse())
