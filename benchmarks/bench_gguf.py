"""The built-in SmolLM2-135M-Instruct GGUF: decode and prefill speed, loading time and memory, against peers.

One run, the same file for every contender:

- ours, weights dequantized to the dtype, on each decode path of ``--paths`` (by default ``auto``, the
  apps' default, which measures the candidates on this machine and caches the choice, and ``eager``);
- HF transformers reading the same GGUF (``from_pretrained(gguf_file=...)``, SDPA, its dynamic cache);
- llama.cpp through ``llama-cpp-python`` on the Q4_1 file itself (what a CPU user would run), when
  ``--llama-cpp-python PATH`` names a Python that has it (it compiles from source: keep it in its own
  virtual environment). Batch 1 only: its high-level API runs one sequence.

Each (dtype, batch) setting runs every contender ``--repeats`` times on the same random prompt, greedy,
no stop tokens, alternating which goes first. Prefill tokens/s = batch x prompt length / (call -> first
token); decode tokens/s = batch x (new tokens - 1) / (first -> last token); medians over the repeats.
Loading is measured in fresh processes: wall time to a ready model and peak RSS (VmHWM) above the
process's RSS after importing torch, against the size of the weights.

    python benchmarks/bench_gguf.py                                  # bf16 + fp32, batch 1 and 8
    python benchmarks/bench_gguf.py --llama-cpp-python /path/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import machine  # noqa: E402

from llama3 import Llama  # noqa: E402
from llama3.checkpoint import builtin_checkpoint  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def time_ours(llm: Llama, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
    times = []
    start = time.perf_counter()
    for _ in llm.stream(prompts, temperature=0.0, max_gen_len=n_new, stop_tokens=[]):
        times.append(time.perf_counter())
    B, T = len(prompts), len(prompts[0])
    return B * T / (times[0] - start), B * (len(times) - 1) / (times[-1] - times[0])


def time_hf(hf, prompts: list[list[int]], n_new: int) -> tuple[float, float]:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(prompts)
    clock = Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                    do_sample=False, streamer=clock, pad_token_id=0)
    t = clock.times[1:]
    B, T = ids.shape
    return B * T / (t[0] - start), B * (len(t) - 1) / (t[-1] - t[0])


LLAMA_CPP = textwrap.dedent("""
    import json, sys, time
    from llama_cpp import Llama
    path, n_new, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    prompt = json.loads(sys.argv[5])
    llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_batch=512, verbose=False)
    out = []
    for _ in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        times = [t1]
        for _ in range(n_new - 1):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
            times.append(time.perf_counter())
        out.append((len(prompt) / (t1 - t0), (len(times) - 1) / (times[-1] - times[0])))
    print(json.dumps(out[1:]))
""")


def time_llama_cpp(python: str, path: Path, prompt: list[int], n_new: int, repeats: int) -> tuple[float, float]:
    res = subprocess.run([python, "-c", LLAMA_CPP, str(path), str(n_new), str(repeats), str(os.cpu_count()),
                          json.dumps(prompt)], capture_output=True, text=True, check=True)
    runs = json.loads(res.stdout)
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


LOAD_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    def hwm_kb():  # this process's own high-water mark (ru_maxrss would carry the parent's over exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    base = hwm_kb()
    t0 = time.perf_counter()
    kind, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    if kind == "ours":
        from llama3.checkpoint import load_model
        m = load_model(path, dtype=dtype)
    else:
        from pathlib import Path
        from transformers import AutoModelForCausalLM
        p = Path(path)
        m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    seconds = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for t in m.parameters())
    peak = hwm_kb()
    print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "over_start_mb": (peak - base) / 1024,
                      "weights_mb": weights / 2**20}))
""")


def time_load(kind: str, path: Path, dtype: str, env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", LOAD_CHILD, kind, str(path), {"bf16": "bfloat16", "fp32": "float32"}[dtype]],
                         capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prefill-len", type=int, default=64, help="prompt length in tokens (random ids)")
    p.add_argument("--decode-tokens", type=int, default=32, help="new tokens per generation")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per contender and setting")
    p.add_argument("--paths", default="auto,eager",
                   help="our decode paths, comma-separated: auto (the apps' default: measured on this machine and "
                        "cached), eager, swapped, compiled, inductor, onednn, or graph (the whole step as one "
                        "torch.compile graph; minutes to compile)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--llama-cpp-python", default=None, help="a Python interpreter with llama-cpp-python installed")
    p.add_argument("--no-load", action="store_true", help="skip the loading measurements")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    path = builtin_checkpoint()
    info = machine.describe()
    print(machine.banner(info))
    print(f"# {path.name}")
    results: dict = {"machine": info, "file": str(path), "speed": [], "load": []}
    for dname in a.dtypes.split(","):
        dtype = DTYPES[dname]
        batches = [int(b) for b in a.batches.split(",")]
        eager = Llama.build(path, max_seq_len=a.prefill_len + a.decode_tokens + 8, max_batch_size=max(batches),
                            device="cpu", dtype=dtype)
        contenders = {}
        for dp in a.paths.split(","):  # every path shares the one model: none changes its weights
            ours = Llama(eager.model, eager.tokenizer, decode_path="eager" if dp == "graph" else dp)
            if dp == "graph":
                ours.compile()
            contenders[f"ours {dp}"] = lambda pr, llm=ours: time_ours(llm, pr, a.decode_tokens)
        if not a.no_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
            contenders["HF transformers"] = lambda pr, m=hf: time_hf(m, pr, a.decode_tokens)
        for B in batches:
            prompts = [prompt_ids(a.prefill_len, eager.model.params.vocab_size, seed=i) for i in range(B)]
            for fn in contenders.values():  # warm-up (calibration, compilation) outside the timing
                fn(prompts)
            labels = {k: k for k in contenders}
            for k in contenders:
                if k == "ours auto":
                    llm = Llama(eager.model, eager.tokenizer, decode_path="auto", report=lambda line: None)
                    labels[k] = f"ours auto: {llm.prepare_decode(B)}"
            runs: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
            for r in range(a.repeats):
                order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
                for name in order:
                    runs[name].append(contenders[name](prompts))
            for name, rs in runs.items():
                row = {"dtype": dname, "batch": B, "contender": labels[name],
                       "prefill_tok_s": statistics.median(x[0] for x in rs),
                       "decode_tok_s": statistics.median(x[1] for x in rs)}
                results["speed"].append(row)
                print(f"{dname:5} batch {B}  {labels[name]:24} prefill {row['prefill_tok_s']:8.0f} tok/s   "
                      f"decode {row['decode_tok_s']:7.1f} tok/s", flush=True)
        del eager
    if a.llama_cpp_python:
        prompt = prompt_ids(a.prefill_len, 49152, seed=0)
        pre, dec = time_llama_cpp(a.llama_cpp_python, path, prompt, a.decode_tokens, a.repeats)
        results["speed"].append({"dtype": "Q4_1", "batch": 1, "contender": "llama.cpp", "prefill_tok_s": pre,
                                 "decode_tok_s": dec})
        print(f"Q4_1  batch 1  {'llama.cpp':16} prefill {pre:8.0f} tok/s   decode {dec:7.1f} tok/s", flush=True)
    if not a.no_load:
        import tempfile

        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "LLAMA3_SAE_CACHE": cache}
            for dname in a.dtypes.split(","):
                for kind, label in (("ours", "ours, first start"), ("ours", "ours, cached"), ("hf", "HF transformers")):
                    if kind == "hf" and a.no_hf:
                        continue
                    row = {"dtype": dname, "loader": label, **time_load(kind, path, dname, env)}
                    results["load"].append(row)
                    print(f"load {dname:5} {label:18} {row['seconds']:6.1f} s  peak RSS {row['peak_mb']:6.0f} MB "
                          f"({row['over_start_mb']:5.0f} MB over the start, weights {row['weights_mb']:.0f} MB: "
                          f"{row['over_start_mb'] / row['weights_mb']:.2f}x)", flush=True)
    print("\n| dtype | batch | contender | prefill tok/s | decode tok/s | decode vs HF |\n|---|---|---|---|---|---|")
    for row in results["speed"]:
        ref = next((r for r in results["speed"] if r["dtype"] == row["dtype"] and r["batch"] == row["batch"]
                    and r["contender"] == "HF transformers"), None)
        ratio = f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
        print(f"| {row['dtype']} | {row['batch']} | {row['contender']} | {row['prefill_tok_s']:.0f} | "
              f"{row['decode_tok_s']:.1f} | {ratio} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
