"""Capture throughput: this project's ``run_capture`` against HF transformers with a forward hook.

Both sides get the same random bf16 weights (Llama-3.2-1B shape by default), the same documents (text of
5-192 tokens, decoded from slices of the bundled sentences so the real tokenizer gives those lengths), and
write the same rows (one per token: activation at the site + token, doc id, position) to safetensors
shards on disk. Rounds alternate between the two so machine load affects both alike.

The HF baseline is what a researcher would write: batches of ``--hf-batch-size`` documents in data order,
right-padded with an attention mask, ``model(...)`` with a forward hook on the decoder layer that copies
the unpadded rows, and a synchronous ``save_file`` every ``--hf-shard-rows`` rows. ``--hf-mode bucketed``
also times HF on this project's length-sorted batches (to separate the effect of bucketing from the rest).

Smoke run (tiny model, under a minute):   python benchmarks/bench_capture.py --quick
Llama-3.2-1B shape on CPU (~10 minutes):  python benchmarks/bench_capture.py --docs 48 --rounds 2
On a GPU:                                 python benchmarks/bench_capture.py --device cuda --docs 20000
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

from capture.batching import plan_batches  # noqa: E402
from capture.capture import run_capture  # noqa: E402
from capture.config import CaptureConfig  # noqa: E402
from capture.store import ActivationStore  # noqa: E402
from llama3.args import ModelArgs  # noqa: E402
from llama3.keys import meta_to_hf_name, permute_rotary  # noqa: E402
from llama3.model import Transformer, init_random_weights, site_name  # noqa: E402
from llama3.tokenizer import Tokenizer, default_tokenizer_path  # noqa: E402

SENTENCES = REPO / "capture" / "data" / "sentences.txt"


def make_documents(tokenizer: Tokenizer, n: int, lo: int, hi: int, dist: str, seed: int) -> list[str]:
    """Texts whose token counts follow ``dist`` within [lo, hi]: slices of the bundled sentences' tokens."""
    rng = random.Random(seed)
    stream = tokenizer.encode(" ".join(SENTENCES.read_text().split()), bos=False, eos=False)
    docs = []
    for _ in range(n):
        if dist == "uniform":
            length = rng.randint(lo, hi)
        else:  # sentence-like: log-normal with a median of ~22 tokens (the seed's data averaged 27.3)
            length = min(hi, max(lo, round(math.exp(rng.gauss(math.log(22), 0.6)))))
        start = rng.randrange(0, len(stream) - hi)
        docs.append(tokenizer.decode(stream[start:start + length]))
    return docs


def build_models(args: ModelArgs, layer: int, device: torch.device, dtype: torch.dtype, with_hf: bool):
    with torch.device("meta"):  # no default init of 1B parameters; allocate once, in the target dtype
        ours = Transformer(args, store_layer_activ=[layer]).to(dtype)
    ours = ours.to_empty(device=device)
    init_random_weights(ours, seed=0, std=0.02, norm_jitter=0.1)
    ours.init_rope(device)
    ours.eval()
    if not with_hf:
        return ours, None
    import transformers

    rope = {"rope_type": "llama3", "factor": args.resolved_rope_scaling_factor,
            "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_pos}
    cfg = transformers.LlamaConfig(
        hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, rope_scaling=rope, max_position_embeddings=131072,
        tie_word_embeddings=args.tie_word_embeddings, torch_dtype=dtype)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    sd = {}
    for name, t in ours.state_dict().items():
        hf_name = meta_to_hf_name(name)
        if hf_name is None or (name == "output.weight" and args.tie_word_embeddings):
            continue
        if name.endswith("attention.wq.weight"):
            t = permute_rotary(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_rotary(t, args.n_kv_heads)
        sd[hf_name] = t  # shares our storage except for the permuted q/k
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if args.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # The rotary buffers are not in the state dict (they are still on the meta device): rebuild them.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg).to(device)
    return ours, hf.eval()


def run_ours(ours: Transformer, tokenizer: Tokenizer, data: Path, out: Path, layer: int, a: argparse.Namespace) -> dict:
    cfg = CaptureConfig(ckpt_dir=Path("random-weights"), data=(data,), sites=f"L{layer}R", out=out,
                        max_tokens=a.max_len, dtype="bf16", tokens_per_batch=a.tokens_per_batch,
                        max_padding=a.max_padding, bucket_tokens=a.bucket_tokens, progress=False)
    t0 = time.perf_counter()
    summary = run_capture(cfg, model=ours, tokenizer=tokenizer)
    seconds = time.perf_counter() - t0  # everything: writer start, reading, tokenising, forward, finalise
    return {"seconds": seconds, "tokens": summary.tokens, "rows": summary.rows, "bytes": summary.bytes}


def run_hf(hf: Any, tokenizer: Tokenizer, texts: list[str], out: Path, layer: int, a: argparse.Namespace,
           bucketed: bool) -> dict:
    from safetensors.torch import save_file

    device = next(hf.parameters()).device
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    ids = [tokenizer.encode(t, bos=False, eos=False)[: a.max_len] for t in texts]
    if bucketed:
        batches = plan_batches([len(x) for x in ids], a.tokens_per_batch, a.max_padding)
    else:
        batches = [list(range(i, min(i + a.hf_batch_size, len(ids)))) for i in range(0, len(ids), a.hf_batch_size)]
    captured: dict[str, torch.Tensor] = {}
    hook = hf.model.layers[layer].register_forward_hook(
        lambda m, i, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    pending: list[dict[str, torch.Tensor]] = []
    n_pending = n_rows = n_tokens = n_bytes = shard = 0

    def flush() -> int:
        nonlocal shard
        t = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
        path = out / f"shard-{shard:06d}.safetensors"
        save_file(t, str(path))
        shard += 1
        pending.clear()
        return path.stat().st_size

    try:
        with torch.no_grad():
            for idx in batches:
                T = max(len(ids[i]) for i in idx)
                tokens = torch.zeros(len(idx), T, dtype=torch.long)
                mask = torch.zeros(len(idx), T, dtype=torch.long)
                for r, i in enumerate(idx):
                    tokens[r, : len(ids[i])] = torch.tensor(ids[i])
                    mask[r, : len(ids[i])] = 1
                hf(input_ids=tokens.to(device), attention_mask=mask.to(device), use_cache=False)
                keep = mask.bool()
                rows = captured["h"][keep.to(device)].cpu()
                doc_ids = torch.tensor(idx).repeat_interleave(keep.sum(1))
                positions = torch.arange(T).expand(len(idx), T)[keep]
                pending.append({"activations": rows, "tokens": tokens[keep].int(), "doc_ids": doc_ids,
                                "positions": positions.int()})
                n_pending += rows.shape[0]
                n_rows += rows.shape[0]
                n_tokens += int(mask.sum())
                if n_pending >= a.hf_shard_rows:
                    n_bytes += flush()
                    n_pending = 0
            if pending:
                n_bytes += flush()
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        hook.remove()
    return {"seconds": time.perf_counter() - t0, "tokens": n_tokens, "rows": n_rows, "bytes": n_bytes}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b", help="model shape (ModelArgs.preset name)")
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's layer count (quick runs)")
    p.add_argument("--layer", type=int, default=8, help="capture resid_post of this layer")
    p.add_argument("--docs", type=int, default=64, help="documents per round")
    p.add_argument("--min-len", type=int, default=5)
    p.add_argument("--max-len", type=int, default=192)
    p.add_argument("--lengths", choices=["sentence", "uniform"], default="sentence",
                   help="document length distribution within [min-len, max-len]")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tokens-per-batch", type=int, default=8192)
    p.add_argument("--bucket-tokens", type=int, default=262144)
    p.add_argument("--max-padding", type=float, default=0.2, help="see llama3-sae capture --help")
    p.add_argument("--hf-batch-size", type=int, default=32, help="documents per HF batch (data order)")
    p.add_argument("--hf-shard-rows", type=int, default=65536, help="rows per HF output file")
    p.add_argument("--hf-mode", choices=["naive", "bucketed", "both", "none"], default="naive")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, layer 2, 64 documents")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.layer, a.docs, a.n_layers = "tiny", 2, 64, None
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    info = machine.describe()
    print(machine.banner(info), flush=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    overrides = {"max_seq_len": max(a.max_len, 256)}
    if a.n_layers:
        overrides["n_layers"] = a.n_layers
    args = ModelArgs.preset(a.preset, **overrides)
    tokenizer = Tokenizer(default_tokenizer_path())
    modes = {"naive": ["naive"], "bucketed": ["bucketed"], "both": ["naive", "bucketed"], "none": []}[a.hf_mode]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ours, hf = build_models(args, a.layer, device, torch.bfloat16, bool(modes))
    print(f"built {a.preset} ({args.n_layers} layers, dim {args.dim}) on {device} in {time.perf_counter() - t0:.1f} s",
          flush=True)

    texts = make_documents(tokenizer, a.docs, a.min_len, a.max_len, a.lengths, seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    data = work / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    results: dict[str, list[dict]] = {"ours": [], **{f"hf-{m}": [] for m in modes}}
    try:
        with torch.inference_mode():
            # Warm-up: one tiny batch each (allocator, kernels), not timed.
            ours.forward_activations(torch.zeros(1, 8, dtype=torch.long, device=device))
            if hf is not None:
                hf(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device), use_cache=False)
        for r in range(a.rounds):
            sides = ["ours", *[f"hf-{m}" for m in modes]]
            if r % 2:
                sides.reverse()
            for side in sides:
                out = work / f"{side}-{r}"
                if side == "ours":
                    res = run_ours(ours, tokenizer, data, out, a.layer, a)
                    res["bytes_per_token"] = res["bytes"] / res["rows"]
                    assert ActivationStore(out / site_name(a.layer)).num_rows == res["rows"]
                else:
                    res = run_hf(hf, tokenizer, texts, out, a.layer, a, bucketed=side == "hf-bucketed")
                    res["bytes_per_token"] = res["bytes"] / res["rows"]
                res["tokens_per_s"] = res["tokens"] / res["seconds"]
                results[side].append(res)
                print(f"round {r} {side:12s} {res['tokens']:>8,} tokens {res['seconds']:8.1f} s "
                      f"{res['tokens_per_s']:10,.1f} tok/s  {res['bytes_per_token']:,.0f} bytes/token", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {side: statistics.median(r["tokens_per_s"] for r in rs) for side, rs in results.items() if rs}
    load_after = os.getloadavg()
    print(f"\n{a.preset} ({args.n_layers} layers) L{a.layer}R, {a.docs} documents ({a.lengths} lengths "
          f"{a.min_len}-{a.max_len}) x {a.rounds} rounds, {device}, {torch.get_num_threads()} threads, "
          f"{datetime.date.today()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print("| capture | tokens/s (median) | ours vs this | bytes/token |")
    print("| --- | ---: | ---: | ---: |")
    for side, tps in summary.items():
        ratio = "" if side == "ours" else f"{summary['ours'] / tps:.2f}x"
        print(f"| {side} | {tps:,.1f} | {ratio} | {results[side][0]['bytes_per_token']:,.1f} |")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a), "results": results, "median_tokens_per_s": summary,
                                      "date": str(datetime.date.today()), "machine": info,
                                      "load_average": [load_before, load_after]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
