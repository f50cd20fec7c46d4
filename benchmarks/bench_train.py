"""SAE training throughput: this project's training loop against a plain dense seed-style loop at the
same configuration, and the data-parallel scaling of the real loop under torchrun.

* ours: ``python -m training`` (the real entry point: memory-mapped store, prefetching, TopK with
  sparse kernels, aux-k, dead-latent tracking, schedule, clipping, decoder projection), tokens/s read
  from its own metrics.jsonl over the windows after the first (start-up and warm-up excluded).
* seed-style: what the original project's loop did per step, written plainly: whole shards loaded
  into memory and cut into consecutive batches, per-token standardisation, ``nn.Linear`` encoder,
  TopK scattered into a dense [batch, n_latents] code, ``nn.Linear`` decoder, dense aux-k over dead
  latents, autograd through everything, decoder projection and renormalisation, clipping, AdamW.
* DDP: ``torchrun --nproc-per-node 2 -m training`` with the same per-rank batch; scaling efficiency =
  tokens/s of N processes / (N x tokens/s of one process with the same threads per process).

Both implementations use the same config (d_model, n_latents, k, k_aux, batch, per-token normalisation,
dead latents after one batch so the aux-k path runs every step).

    python benchmarks/bench_train.py --quick                 # ~1 minute on 2 cores
    python benchmarks/bench_train.py --repeat 3              # alternate rounds, report the best of each
    python benchmarks/bench_train.py                         # d 768, 16384 latents, batch 1024
    python benchmarks/bench_train.py --device cuda --preset seed   # the original d 3072, 65536 latents
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from training.synthetic import write_store  # noqa: E402

PRESETS = {
    "quick": dict(d_model=256, n_latents=4096, k=32, k_aux=256, batch=1024, steps=12, warmup=4),
    "default": dict(d_model=768, n_latents=16384, k=64, k_aux=512, batch=1024, steps=16, warmup=4),
    "seed": dict(d_model=3072, n_latents=65536, k=64, k_aux=2048, batch=1024, steps=30, warmup=5),
}


@dataclass
class Options:
    d_model: int
    n_latents: int
    k: int
    k_aux: int
    batch: int
    steps: int
    warmup: int
    device: str
    threads: int
    ddp: int
    """Processes for the scaling run (0: skip)."""


# --------------------------------------------------------------------------- the seed-style peer
class SeedStyleSAE(nn.Module):
    """The original layout: nn.Linear encoder and decoder (a latent's decoder vector is a column)."""

    def __init__(self, d_model: int, n_latents: int, k: int):
        super().__init__()
        self.k = k
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        self.encoder = nn.Linear(d_model, n_latents)
        self.decoder = nn.Linear(n_latents, d_model, bias=False)
        with torch.no_grad():
            w = torch.empty(n_latents, d_model)
            nn.init.orthogonal_(w)
            w /= w.norm(dim=1, keepdim=True)
            self.encoder.weight.copy_(w)
            self.decoder.weight.copy_(w.t())

    def losses(self, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)
        pre = torch.relu(self.encoder(x - self.b_pre))
        top = pre.topk(self.k, dim=-1)
        h = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        x_hat = self.decoder(h) + self.b_pre
        mse = (x_hat - x).pow(2).mean()
        fired = (h > 0).any(0)
        aux = mse.new_zeros(())
        n_dead = int(dead.sum())
        if n_dead:
            residual = (x - x_hat).detach()
            masked = pre.masked_fill(~dead, float("-inf"))
            top_aux = masked.topk(min(k_aux, n_dead), dim=-1)
            h_aux = torch.zeros_like(pre).scatter(-1, top_aux.indices, top_aux.values.clamp_min(0))
            e_hat = self.decoder(h_aux)
            aux = (e_hat - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
        return mse + aux / 32, fired

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        w, g = self.decoder.weight, self.decoder.weight.grad
        g -= w * (g * w).sum(0, keepdim=True) / (w * w).sum(0, keepdim=True)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.decoder.weight /= self.decoder.weight.norm(dim=0, keepdim=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_seed_style(store: Path, opt: Options) -> dict:
    """Tokens/s of the dense seed-style loop over the same store (after ``warmup`` steps)."""
    from capture.store import ActivationStore

    torch.set_num_threads(opt.threads)
    store_ = ActivationStore(store)
    sae = SeedStyleSAE(opt.d_model, opt.n_latents, opt.k).to(opt.device)
    optim = torch.optim.AdamW(sae.parameters(), lr=5e-5, betas=(0.85, 0.9999), eps=6.25e-10)
    since_fired = torch.zeros(opt.n_latents, dtype=torch.int64, device=opt.device)
    shard, shard_i, pos = None, 0, 0
    times = []
    for step in range(opt.warmup + opt.steps):
        sync(opt.device)
        t0 = time.perf_counter()
        if shard is None or pos + opt.batch > shard.shape[0]:
            shard = store_.read_shard(shard_i % len(store_.shards))["activations"]
            shard_i, pos = shard_i + 1, 0
        x = shard[pos:pos + opt.batch].to(opt.device).float()
        pos += opt.batch
        dead = since_fired >= opt.batch  # dead after one batch without firing, as in the ours run
        loss, fired = sae.losses(x, dead, opt.k_aux)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optim.step()
        sae.normalize_decoder_()
        since_fired += opt.batch
        since_fired[fired] = 0
        sync(opt.device)
        if step >= opt.warmup:
            times.append(time.perf_counter() - t0)
    return {"tokens_per_s": opt.batch / statistics.median(times), "step_s_median": statistics.median(times),
            "step_s_min": min(times), "steps_timed": len(times)}


# --------------------------------------------------------------------------- the real loop
def train_argv(store: Path, out: Path, opt: Options) -> list[str]:
    return ["--store", str(store), "--out", str(out), "--n-latents", str(opt.n_latents), "--k", str(opt.k),
            "--k-aux", str(opt.k_aux), "--batch-size", str(opt.batch), "--steps", str(opt.warmup + opt.steps),
            "--log-every", str(opt.warmup), "--val-every", "0", "--checkpoint-every", str(10**9),
            "--normalization", "per_token", "--dead-after-tokens", str(opt.batch), "--device", opt.device,
            "--val-max-rows", str(opt.batch), "--no-progress", "--no-plots", "--overwrite", "--no-resume"]


def run_ours(store: Path, out: Path, opt: Options, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(opt.threads), "PYTHONPATH": str(REPO)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "training"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "training"]
    proc = subprocess.run(cmd + train_argv(store, out, opt), cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["split"] == "train"][1:]  # the first window holds start-up
    total = sum(r["tokens_per_s"] for r in windows) / len(windows)
    return {"tokens_per_s_total": total, "tokens_per_s_per_process": total / nproc, "processes": nproc,
            "windows": len(windows)}


def main(argv: list[str] | None = None) -> int:
    print(machine.banner(), flush=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    for name in ("d_model", "n_latents", "k", "k_aux", "batch", "steps", "warmup"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: CPU count // 2 "
                   "for the DDP comparison to fit, at least 1)")
    p.add_argument("--ddp", type=int, default=2, help="processes for the DDP scaling run (0 skips it)")
    p.add_argument("--repeat", type=int, default=1, help="alternating rounds; the best of each is reported")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    preset = dict(PRESETS["quick" if a.quick else a.preset])
    for name in preset:
        if getattr(a, name) is not None:
            preset[name] = getattr(a, name)
    cpus = os.cpu_count() or 1
    threads = a.threads or max(1, cpus // max(a.ddp, 1))
    ddp = a.ddp if a.device == "cpu" or torch.cuda.device_count() >= a.ddp else 0
    opt = Options(**preset, device=a.device, threads=threads, ddp=ddp)
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": machine.describe(), "cpus": cpus, "torch": torch.__version__,
            "load_average": os.getloadavg(), "options": asdict(opt)}
    if a.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(info, indent=1))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        rows = opt.batch * (opt.warmup + opt.steps) * max(ddp, 1) + opt.batch * 2
        g = torch.Generator().manual_seed(0)
        # Activations with a mean and uneven scales, like a residual stream (the values do not change the speed).
        x = torch.randn(rows, opt.d_model, generator=g) * (torch.rand(opt.d_model, generator=g) + 0.5) + 0.3
        store = write_store(tmp / "store", x.to(torch.bfloat16), shard_rows=max(opt.batch * 8, 8192),
                            dtype=torch.bfloat16)
        del x
        results: dict = {"info": info, "rounds": []}
        # Rounds alternate the implementations so that background load on a shared machine hits all of
        # them alike; the best round of each is reported.
        for r in range(a.repeat):
            rnd = {"seed_style": run_seed_style(store, opt)}
            print(f"[{r + 1}/{a.repeat}] seed-style dense loop: {rnd['seed_style']['tokens_per_s']:,.0f} tokens/s")
            rnd["ours_1"] = run_ours(store, tmp / "ours1", opt, 1)
            print(f"[{r + 1}/{a.repeat}] llama3-sae train (1 process): "
                  f"{rnd['ours_1']['tokens_per_s_total']:,.0f} tokens/s")
            if ddp > 1:
                rnd[f"ours_{ddp}"] = run_ours(store, tmp / f"ours{ddp}", opt, ddp)
                print(f"[{r + 1}/{a.repeat}] llama3-sae train ({ddp} processes, DDP): "
                      f"{rnd[f'ours_{ddp}']['tokens_per_s_total']:,.0f} tokens/s total")
            results["rounds"].append(rnd)
        best = {key: max((rnd[key] for rnd in results["rounds"]),
                         key=lambda v: v.get("tokens_per_s", v.get("tokens_per_s_total", 0)))
                for key in results["rounds"][0]}
        results.update(best)
        ours, peer = results["ours_1"]["tokens_per_s_total"], results["seed_style"]["tokens_per_s"]
        results["speedup_vs_seed_style"] = ours / peer
        if ddp > 1:
            total = results[f"ours_{ddp}"]["tokens_per_s_total"]
            results["ddp_scaling_efficiency"] = total / (ddp * results["ours_1"]["tokens_per_s_total"])
    print(f"\nbest of {a.repeat}: seed-style {results['seed_style']['tokens_per_s']:,.0f} tokens/s, ours "
          f"{results['ours_1']['tokens_per_s_total']:,.0f} tokens/s per process")
    print(f"speed-up over the seed-style loop: {results['speedup_vs_seed_style']:.2f}x per process"
          f" ({opt.threads} thread(s) each)")
    if "ddp_scaling_efficiency" in results:
        print(f"DDP scaling efficiency with {ddp} processes: {results['ddp_scaling_efficiency']:.0%}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
