"""What steering costs during decoding: decode tokens/s with the SAE's steering function spliced in,
against the same model without it, in the same run (alternating order).

Conditions: plain; 1 and 8 additive edits (``x + value * W_dec[i]``: no encoder pass); 1 set edit (needs
the SAE's code at every position: one encoder matmul per token). Models: the built-in SmolLM2-135M
(fp32, an SAE of 4,608 latents at L21R, the demo's shape) and the Llama-3.2-1B shape with random weights
(bf16, 32,768 latents at L8R). Batch 1 and 4, greedy, no stop tokens.

    python benchmarks/bench_steering.py                 # both models, batch 1 and 4
    python benchmarks/bench_steering.py --models smollm2 --new-tokens 16 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from bench_llama import build_model  # noqa: E402
from llama3 import Llama, ModelArgs  # noqa: E402
from llama3.checkpoint import builtin_checkpoint  # noqa: E402
from llama3.tokenizer import Tokenizer, default_tokenizer_path  # noqa: E402
from sae import Edit, SAEConfig, SparseAutoencoder, steer_fn  # noqa: E402

MODELS = {"smollm2": ("L21R", 4608, torch.float32), "llama3.2-1b": ("L8R", 32768, torch.bfloat16)}


def build(name: str, max_seq_len: int, batch: int) -> tuple[Llama, SparseAutoencoder, str]:
    site, n_latents, dtype = MODELS[name]
    if name == "smollm2":
        llm = Llama.build(builtin_checkpoint(), max_seq_len=max_seq_len, max_batch_size=batch, device="cpu",
                          dtype=dtype)
    else:
        model = build_model(ModelArgs.preset(name, max_seq_len=max_seq_len, max_batch_size=batch), "cpu", dtype, 0)
        model.setup_cache(batch, max_seq_len)
        llm = Llama(model, Tokenizer(default_tokenizer_path()))
    d = llm.model.params.dim
    sae = SparseAutoencoder(SAEConfig(d_model=d, n_latents=n_latents, k=64, site=site, normalization="dataset"),
                            seed=0).to(dtype).eval()
    return llm, sae, site


def decode_steps(llm: Llama, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Seconds of each decode step (prefill excluded)."""
    steps = llm.stream(prompts, temperature=0.0, max_gen_len=new_tokens, stop_tokens=[])
    next(steps)  # the prefill's step
    times, t = [], time.perf_counter()
    for _ in steps:
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times


def run(name: str, batches: list[int], new_tokens: int, repeats: int, decode_path: str) -> list[dict]:
    rows = []
    for batch in batches:
        llm, sae, site = build(name, 64 + new_tokens, batch)
        llm.set_decode_path(decode_path)
        path = llm.prepare_decode(batch)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(100, 5000, (32,), generator=g).tolist() for _ in range(batch)]
        conditions = {"plain": None, "1 add edit": [Edit(7, "add", 4.0)],
                      "8 add edits": [Edit(7 + i, "add", 4.0) for i in range(8)], "1 set edit": [Edit(7, "set", 4.0)]}
        times: dict[str, list[float]] = {c: [] for c in conditions}
        names = list(conditions)
        for r in range(repeats + 1):  # the first round warms up and is not counted
            for c in names if r % 2 else names[::-1]:
                edits = conditions[c]
                fns = {site: steer_fn(sae, edits)} if edits else None
                with torch.inference_mode(), llm.model.hooks(None, fns):
                    steps = decode_steps(llm, prompts, new_tokens)
                if r:
                    times[c] += steps
        # The median step over all rounds: robust to bursts of background load on a shared machine.
        base = batch / statistics.median(times["plain"])
        for c in names:
            tps = batch / statistics.median(times[c])
            rows.append({"model": name, "batch": batch, "decode_path": path, "condition": c, "decode_tps": tps,
                         "overhead": base / tps - 1})
            print(f"  {name} batch {batch} ({path}) {c:12s} {tps:8.2f} tok/s  overhead {100 * (base / tps - 1):+.1f}%",
                  flush=True)
        del llm, sae
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,llama3.2-1b", help="comma-separated: smollm2, llama3.2-1b")
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up round)")
    p.add_argument("--decode-path", default="auto",
                   help="how decode steps run (auto, the apps' default, measures; or eager, compiled, ...): a "
                        "compiled path runs the hooked block eagerly, so steering costs more relative to it")
    a = p.parse_args(argv)
    info = machine.describe()
    print(machine.banner(info), flush=True)
    rows = []
    for name in a.models.split(","):
        rows += run(name.strip(), [int(b) for b in a.batches.split(",")], a.new_tokens, a.repeats, a.decode_path)
    print(f"\nsteering overhead during greedy decode, {a.new_tokens} new tokens, median step of {a.repeats} rounds; "
          f"{info['cpu']}, {info['threads']} threads, {time.strftime('%Y-%m-%d')}\n")
    print("| model | batch | decode path | condition | decode tok/s | overhead vs plain |")
    print("| --- | ---: | --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['decode_path']} | {r['condition']} | {r['decode_tps']:.2f} | "
              f"{100 * r['overhead']:+.1f}% |")
    return rows


if __name__ == "__main__":
    main()
