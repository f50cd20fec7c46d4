"""Decode and prefill speed of this project's Llama against HF transformers ``generate``, in one run.

Both models hold the same random weights (Llama-3.2-1B widths by default) in the same dtype; the HF
twin is a ``LlamaForCausalLM`` assigned our tensors (q/k rows permuted to HF's rotary layout, every
other weight shared, so memory holds one copy). Each repeat runs the same random prompt through
``Llama.stream`` (greedy, batch 1; each decode path of ``--paths``, by default the apps' ``auto``) and through HF
``generate`` (greedy, its default dynamic cache and SDPA attention), alternating which goes first, so
background load hits both alike. Times come from each loop's own per-token callback:

- prefill tokens/s = prompt length / (call -> first generated token), setup included for both;
- decode tokens/s = (new tokens - 1) / (first token -> last token);
- decode GB/s = bytes of the weights a decode step reads (every matrix once; a tied head once) x tokens/s.

The table shows medians over the repeats, the best decode, and the decode rate from the median time
between tokens over all repeats (robust to bursts of background load). ``--int8`` adds our int8
weight-only model (``llama3.quant``) and reports how often its greedy tokens agree with bf16.

    python benchmarks/bench_llama.py --quick                  # smoke run: tiny model, a minute or two
    python benchmarks/bench_llama.py                          # Llama-3.2-1B widths, bf16, CPU
    python benchmarks/bench_llama.py --int8 --repeats 5
    python benchmarks/bench_llama.py --device cuda            # GPU: adds % of the HBM bandwidth limit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from llama3 import Llama, ModelArgs, Transformer  # noqa: E402
from llama3.keys import meta_to_hf_name, permute_rotary  # noqa: E402
from llama3.tokenizer import Tokenizer, default_tokenizer_path  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Peak HBM bandwidth (GB/s) by a substring of torch.cuda.get_device_name(); --peak-gbps overrides.
GPU_PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
                 "A100-SXM4-40GB": 1555.0, "A100": 1935.0, "L40S": 864.0, "A10G": 600.0, "L4": 300.0}


@dataclass
class Options:
    preset: str = "llama3.2-1b"
    """model shape (a ``ModelArgs`` preset); weights are random"""
    device: str = "cpu"
    """cpu or cuda"""
    dtype: str = "bf16"
    """weight and activation dtype: bf16, fp16 or fp32"""
    decode_tokens: int = 64
    """new tokens per generation (the decode rate is measured over all but the first)"""
    prefill_len: int = 128
    """prompt length in tokens (random ids)"""
    repeats: int = 3
    """timed generations per model, after one untimed warm-up each"""
    paths: str = "auto"
    """our decode paths to time, comma-separated: auto (the apps' default: measured on this machine, cached),
    any of eager, swapped, compiled, inductor, onednn, or graph (the whole step as one torch.compile graph,
    ``Llama.compile``; minutes to compile)"""
    compile_prefill: bool = False
    """with the graph path, also compile our prefill (``Llama.compile(prefill=True)``, dynamic shapes)"""
    int8: bool = False
    """also run our model with int8 weight-only linears, and report greedy agreement with the base dtype"""
    hf: bool = True
    """run the HF transformers peer (``--no-hf`` to time ours alone)"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""
    peak_gbps: float | None = None
    """memory bandwidth limit to report decode against (GPU: looked up from the device name)"""
    seed: int = 0
    """seed of the weights and the prompt"""
    json: str | None = None
    """also write the results to this JSON file"""
    quick: bool = False
    """smoke run: the tiny preset, 16 prompt and 16 new tokens, 2 repeats"""

    def __post_init__(self) -> None:
        if self.quick:
            self.preset, self.prefill_len, self.decode_tokens, self.repeats = "tiny", 16, 16, 2
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.decode_tokens < 2:
            problems.append("--decode-tokens must be >= 2 (the decode rate is measured after the first token)")
        if self.prefill_len < 1 or self.repeats < 1:
            problems.append("--prefill-len and --repeats must be >= 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append("--device cuda but torch sees no CUDA device")
        if problems:
            raise SystemExit("bench_llama.py: " + "; ".join(problems))


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Options):
        flag = "--" + f.name.replace("_", "-")
        help_text = _FIELD_DOCS.get(f.name, "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    return Options(**vars(parser.parse_args(argv)))


def _field_docs() -> dict[str, str]:
    """The docstring under each Options field, read from this file's source (the --help text)."""
    import ast

    tree = ast.parse(Path(__file__).read_text())
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Options":
            body = node.body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[a.target.id] = str(b.value.value)
    return docs


_FIELD_DOCS = _field_docs()


# --------------------------------------------------------------------------- models
def build_model(args: ModelArgs, device: str, dtype: torch.dtype, seed: int) -> Transformer:
    """Random weights (normal(0, 0.02); norms 1) straight in ``dtype``: built on the meta device so a
    1B model never exists in fp32."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model = model.to_empty(device="cpu")
    if args.tie_word_embeddings:  # to_empty gives every name its own tensor: share the head again
        model.output.weight = model.tok_embeddings.weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model = model.to(device)
    model.init_rope(device)
    return model.eval()


def hf_twin(model: Transformer):
    """A transformers ``LlamaForCausalLM`` holding ``model``'s tensors (wq/wk permuted copies)."""
    import transformers

    from tests.helpers import hf_config

    p = model.params
    config = hf_config(p)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    sd = {}
    for name, t in model.state_dict().items():
        hf_name = meta_to_hf_name(name)
        if hf_name is None or (p.tie_word_embeddings and name == "output.weight"):
            continue
        if name.endswith("attention.wq.weight"):
            t = permute_rotary(t, p.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_rotary(t, p.n_kv_heads)
        sd[hf_name] = t
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF twin: missing {missing}, unexpected {unexpected}")
    if p.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    device = model.tok_embeddings.weight.device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config).to(device)  # was on meta
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    return hf.eval()


def int8_twin(model: Transformer) -> Transformer:
    """Our model again, sharing the embedding and norms, with int8 weight-only linears."""
    from llama3.quant import quantize_int8

    with torch.device("meta"):
        q = Transformer(model.params)
    q.load_state_dict(model.state_dict(), assign=True)
    if model.params.tie_word_embeddings:
        q.output.weight = q.tok_embeddings.weight
    q.init_rope(model.tok_embeddings.weight.device)
    return quantize_int8(q.eval())


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes of the matrices one decode step reads: every linear weight (and int8 scales) once."""
    seen, total = set(), 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Int8Linear":
            for t in (mod.weight, getattr(mod, "scales", None)):
                if t is not None and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- timing
@dataclass
class Run:
    prefill_tps: float
    decode_tps: float
    tokens: list[int]
    step_s: list[float]
    """seconds between consecutive generated tokens"""


def make_run(n_prompt: int, start: float, times: list[float], tokens: list[int]) -> Run:
    steps = [b - a for a, b in zip(times, times[1:])]
    return Run(n_prompt / (times[0] - start), len(steps) / (times[-1] - times[0]), tokens, steps)


def sync_fn(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def run_ours(llm: Llama, prompt: list[int], n_new: int, sync) -> Run:
    times: list[float] = []
    tokens: list[int] = []
    sync()
    start = time.perf_counter()
    for step in llm.stream([prompt], temperature=0.0, max_gen_len=n_new, stop_tokens=[]):
        sync()
        times.append(time.perf_counter())
        tokens.append(step.tokens[0])
    assert len(tokens) == n_new, (len(tokens), n_new)
    return make_run(len(prompt), start, times, tokens)


def run_hf(hf, prompt: list[int], n_new: int, sync) -> Run:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Timestamps each put(): the prompt first, then every new token."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            sync()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    device = hf.model.embed_tokens.weight.device
    ids = torch.tensor([prompt], device=device)
    clock = Clock()
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, streamer=clock)
    t = clock.times[1:]  # drop the prompt's put
    assert len(t) == n_new, (len(t), n_new)
    return make_run(len(prompt), start, t, out[0, len(prompt):].tolist())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def teacher_forced(ref: Callable, other: Callable, prompt: list[int], continuation: list[int],
                   device: torch.device) -> tuple[float, float]:
    """Feed both models prompt + continuation (no cache): the share of the continuation's positions
    where their argmax agrees, and the relative difference of their logits there."""
    seq = torch.tensor([prompt + continuation[:-1]], device=device)
    a = ref(seq)[0, len(prompt) - 1:].float()
    b = other(seq)[0, len(prompt) - 1:].float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return agree, ((a - b).norm() / a.norm()).item()


# --------------------------------------------------------------------------- main
def _contestants(opt: Options, model: Transformer, tokenizer: Tokenizer, prompt: list[int],
                 sync: Callable[[], None]) -> tuple[dict[str, tuple[Callable[[], Run], int]], Transformer | None, Any]:
    """name -> (one timed run, bytes read per decode step), the int8 twin (or None) and the HF twin (or None)."""
    max_seq_len = opt.prefill_len + opt.decode_tokens
    n_bytes = decode_bytes(model)
    contestants: dict[str, tuple[Callable[[], Run], int]] = {}
    for path in opt.paths.split(","):
        ours = Llama(model, tokenizer, decode_path="eager" if path == "graph" else path)
        if path == "graph":
            ours.compile(prefill=opt.compile_prefill)
        label = f"auto: {ours.prepare_decode(1)}" if path == "auto" else path
        contestants[f"ours ({label})"] = (lambda llm=ours: run_ours(llm, prompt, opt.decode_tokens, sync), n_bytes)
    hf = None
    if opt.hf:
        hf = hf_twin(model)
        contestants["HF generate"] = (lambda: run_hf(hf, prompt, opt.decode_tokens, sync), n_bytes)
    qmodel = None
    if opt.int8:
        qmodel = int8_twin(model)
        qmodel.setup_cache(1, max_seq_len)
        q = Llama(qmodel, tokenizer, decode_path="compiled")
        contestants["ours int8 (compiled)"] = (lambda: run_ours(q, prompt, opt.decode_tokens, sync), decode_bytes(qmodel))
    return contestants, qmodel, hf


def _measure(contestants: dict[str, tuple[Callable[[], Run], int]], repeats: int) -> dict[str, list[Run]]:
    """A warm-up of each, then ``repeats`` rounds in alternating order (drift hits every contestant alike)."""
    names = list(contestants)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for name in names:  # warm-up: compilation, allocator, caches
        t = time.perf_counter()
        contestants[name][0]()
        print(f"warm-up {name}: {time.perf_counter() - t:.1f}s", flush=True)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            run = contestants[name][0]()
            runs[name].append(run)
            print(f"  repeat {r + 1}/{repeats} {name:22s} prefill {run.prefill_tps:9.1f} tok/s   "
                  f"decode {run.decode_tps:7.2f} tok/s", flush=True)
    return runs


def _table(opt: Options, runs: dict[str, list[Run]], contestants: dict[str, tuple[Callable[[], Run], int]],
           peak: float | None) -> tuple[dict[str, Any], list[str]]:
    """Per-contestant medians and ratios to HF, as a results dict and the lines of a Markdown table."""
    hf_name = "HF generate" if opt.hf else None
    stats: dict[str, dict[str, float]] = {}
    for n, rs in runs.items():
        steps = [s for r in rs for s in r.step_s]
        stats[n] = {"prefill_tps": statistics.median(r.prefill_tps for r in rs),
                    "decode_tps": statistics.median(r.decode_tps for r in rs),
                    "decode_tps_best": max(r.decode_tps for r in rs),
                    # 1 / median time between tokens over all repeats: robust to bursts of background load
                    "decode_tps_median_step": 1.0 / statistics.median(steps)}
        stats[n]["decode_gbps"] = contestants[n][1] * stats[n]["decode_tps"] / 1e9
    header = ["model", "prefill tok/s", "decode tok/s", "decode best", "decode tok/s (median step)", "decode GB/s"]
    header += ["% of peak BW"] if peak else []
    header += ["prefill vs HF", "decode vs HF", "median step vs HF"] if hf_name else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    models: dict[str, Any] = {}
    for n, st in stats.items():
        row = [n, f"{st['prefill_tps']:.1f}", f"{st['decode_tps']:.2f}", f"{st['decode_tps_best']:.2f}",
               f"{st['decode_tps_median_step']:.2f}", f"{st['decode_gbps']:.1f}"]
        if peak:
            row.append(f"{100 * st['decode_gbps'] / peak:.0f}%")
        entry = dict(st, runs=[{k: v for k, v in asdict(r).items() if k != "tokens"} for r in runs[n]])
        if hf_name:
            ratios = {f"{k}_vs_hf": st[k] / stats[hf_name][k] for k in ("prefill_tps", "decode_tps",
                                                                         "decode_tps_median_step")}
            row += [f"{v:.2f}x" for v in ratios.values()]
            entry |= ratios
        models[n] = entry
        lines.append("| " + " | ".join(row) + " |")
    return models, lines


def _agreement(opt: Options, model: Transformer, runs: dict[str, list[Run]], prompt: list[int],
               qmodel: Transformer | None, hf: Any) -> tuple[dict[str, Any], list[str]]:
    """Greedy agreement: the same weights should give the same tokens (up to rounding of near-ties)."""
    names = list(runs)
    ref_tokens = runs[names[0]][0].tokens
    results: dict[str, Any] = {}
    notes = []
    device = model.tok_embeddings.weight.device
    model.free_cache()  # the teacher-forced passes below run without the cache
    if hf is not None:
        k = common_prefix(ref_tokens, runs["HF generate"][0].tokens)
        tf, err = teacher_forced(model, lambda x: hf(x).logits, prompt, ref_tokens, device)
        notes.append(f"ours vs HF: greedy first {k}/{opt.decode_tokens} tokens identical; teacher-forced top-1 "
                     f"agreement {100 * tf:.1f}%, logits differ by {err:.1e} relative ({opt.dtype} rounding; "
                     f"random weights make near-ties common)")
        results |= {"ours_vs_hf_common_prefix": k, "ours_vs_hf_teacher_forced_agreement": tf,
                    "ours_vs_hf_logits_rel_diff": err}
    if qmodel is not None:
        qmodel.free_cache()
        k = common_prefix(ref_tokens, runs[names[-1]][0].tokens)
        tf, err = teacher_forced(model, qmodel, prompt, ref_tokens, device)
        notes.append(f"int8 vs {opt.dtype}: greedy first {k}/{opt.decode_tokens} tokens identical; teacher-forced "
                     f"top-1 agreement {100 * tf:.1f}%, logits differ by {err:.1e} relative")
        results |= {"int8_common_prefix": k, "int8_teacher_forced_agreement": tf, "int8_logits_rel_diff": err}
    return results, notes


def main(argv: list[str] | None = None) -> dict:
    opt = parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    info = machine.describe()
    print(machine.banner(info), flush=True)
    sync = sync_fn(opt.device)
    max_seq_len = opt.prefill_len + opt.decode_tokens
    args = ModelArgs.preset(opt.preset, max_seq_len=max_seq_len, max_batch_size=1)
    tokenizer = Tokenizer(default_tokenizer_path())
    if args.vocab_size != tokenizer.n_words:
        raise SystemExit(f"preset {opt.preset} has vocab_size={args.vocab_size}; the Llama 3 tokenizer has "
                         f"{tokenizer.n_words}")
    t = time.perf_counter()
    model = build_model(args, opt.device, DTYPES[opt.dtype], opt.seed)
    model.setup_cache(1, max_seq_len)
    print(f"built {opt.preset} ({sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params, "
          f"{decode_bytes(model) / 1e9:.2f} GB read per decode step) in {time.perf_counter() - t:.1f}s", flush=True)
    prompt = torch.randint(0, args.vocab_size, (opt.prefill_len,),
                           generator=torch.Generator().manual_seed(opt.seed + 1)).tolist()
    contestants, qmodel, hf = _contestants(opt, model, tokenizer, prompt, sync)
    runs = _measure(contestants, opt.repeats)

    peak = opt.peak_gbps
    device_name = machine.cpu_name()
    if opt.device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
        if peak is None:
            peak = next((v for k, v in GPU_PEAK_GBPS.items() if k in device_name), None)
    models, lines = _table(opt, runs, contestants, peak)
    results: dict[str, Any] = {"options": asdict(opt),
                               "machine": info, "device": device_name, "loadavg_after": os.getloadavg(),
                               "decode_bytes": {n: contestants[n][1] for n in contestants}, "models": models}
    print()
    print(f"{opt.preset}, {opt.dtype}, {opt.device} ({device_name}, {torch.get_num_threads()} threads), batch 1, "
          f"greedy, prompt {opt.prefill_len}, {opt.decode_tokens} new tokens, median of {opt.repeats} repeats; "
          f"load average {info['load_avg']} -> {os.getloadavg()[0]:.1f}")
    print("\n".join(lines))
    agreement, notes = _agreement(opt, model, runs, prompt, qmodel, hf)
    results |= agreement
    for note in notes:
        print(f"- {note}")
    if opt.json:
        Path(opt.json).write_text(json.dumps(results, indent=2))
    return results

if __name__ == "__main__":
    main()
