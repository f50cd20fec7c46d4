"""Peak resident memory while loading a checkpoint: ours (Meta and HF layouts) against HF ``from_pretrained``.

The parent writes one random model (Llama-3.2-1B widths, bf16 by default) twice into a temporary
directory, as a Meta checkpoint (``save_meta_checkpoint``) and as an HF one (transformers'
``save_pretrained``), then loads each in a fresh subprocess, so that no allocation of the parent or
of an earlier load is counted:

- ours / Meta layout:  ``llama3.checkpoint.load_model(dir, dtype=...)``
- ours / HF layout:    the same call on the HF directory (q/k rows un-permuted on load)
- HF / HF layout:      ``LlamaForCausalLM.from_pretrained(dir, dtype=...)``, the peer

Each child imports everything first and notes its resident set (the baseline), loads, then runs one
short forward pass, which touches every weight (memory-mapped pages only become resident when read).
Reported per child: the peak resident set above the baseline (the kernel's ``VmHWM``) at the end of
the load and after the forward pass, as a multiple of the weights' bytes, plus the load time. A
sampler thread also records the peak of the anonymous and file-backed parts (``RssAnon``/``RssFile``
every 2 ms): file-backed pages are the checkpoint's own mapped pages, shared with the page cache.

    python benchmarks/bench_load_memory.py                 # llama3.2-1b widths, bf16 (writes ~5 GB to a temp dir)
    python benchmarks/bench_load_memory.py --quick         # tiny preset
    python benchmarks/bench_load_memory.py --dtype fp32    # load a bf16 checkpoint as fp32
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

DTYPE_NAMES = ("bf16", "fp16", "fp32")
CASES = (("ours", "meta"), ("ours", "hf"), ("HF from_pretrained", "hf"))


# --------------------------------------------------------------------------- child: one load
def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


class _Sampler(threading.Thread):
    """Peaks of RssAnon and RssFile, sampled every 2 ms (the kernel keeps a peak of the total only)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status_kb()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            time.sleep(0.002)


def child(loader: str, ckpt_dir: str, dtype_name: str) -> None:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if loader == "ours":
        from llama3.checkpoint import load_model
    else:
        import transformers  # noqa: F401  (imported before the baseline)
        from transformers import LlamaForCausalLM
    torch.set_grad_enabled(False)
    base = _status_kb()
    sampler = _Sampler()
    sampler.start()
    t = time.perf_counter()
    if loader == "ours":
        model = load_model(ckpt_dir, dtype=dtype, device="cpu")
        run = lambda ids: model(ids)  # noqa: E731
    else:
        model = LlamaForCausalLM.from_pretrained(ckpt_dir, dtype=dtype).eval()
        run = lambda ids: model(ids).logits  # noqa: E731
    load_s = time.perf_counter() - t
    after_load = _status_kb()
    peak_load = dict(sampler.peak)
    run(torch.arange(8)[None])
    after_forward = _status_kb()
    sampler.stop.set()
    sampler.join()
    seen, n_bytes = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n_bytes += p.numel() * p.element_size()
    print(json.dumps({
        "weights_bytes": n_bytes, "load_s": load_s, "baseline_kb": base["VmRSS"],
        "peak_load_kb": after_load["VmHWM"], "rss_after_load_kb": after_load["VmRSS"],
        "peak_forward_kb": after_forward["VmHWM"], "rss_after_forward_kb": after_forward["VmRSS"],
        "peak_anon_kb": sampler.peak["RssAnon"], "peak_file_kb": sampler.peak["RssFile"],
        "peak_anon_load_kb": peak_load["RssAnon"], "peak_file_load_kb": peak_load["RssFile"],
        "baseline_anon_kb": base["RssAnon"], "baseline_file_kb": base["RssFile"],
    }))


# --------------------------------------------------------------------------- parent
def write_checkpoints(preset: str, root: Path, seed: int) -> tuple[Path, Path, int]:
    import torch
    from bench_llama import build_model, hf_twin

    from llama3 import ModelArgs
    from llama3.checkpoint import save_meta_checkpoint
    from llama3.tokenizer import default_tokenizer_path

    args = ModelArgs.preset(preset)
    model = build_model(args, "cpu", torch.bfloat16, seed)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tok = default_tokenizer_path()
    meta_dir = save_meta_checkpoint(model, root / "meta", tokenizer_path=tok)
    hf_dir = root / "hf"
    hf_twin(model).save_pretrained(hf_dir)
    (hf_dir / "original").mkdir(exist_ok=True)
    shutil.copyfile(tok, hf_dir / "original" / "tokenizer.model")
    return meta_dir, hf_dir, n_bytes


def main(argv: list[str] | None = None) -> dict:
    print(machine.banner(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama3.2-1b", help="model shape (a ModelArgs preset); weights are random")
    parser.add_argument("--dtype", default="bf16", choices=DTYPE_NAMES,
                        help="dtype to load as (the checkpoints are written in bf16)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir, removed after)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--quick", action="store_true", help="smoke run on the tiny preset")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    opt = parser.parse_args(argv)
    if opt.child:
        child(opt.child[0], opt.child[1], opt.dtype)
        return {}
    if opt.quick:
        opt.preset = "tiny"

    root = Path(opt.dir) if opt.dir else Path(tempfile.mkdtemp(prefix="bench_load_memory_"))
    try:
        t = time.perf_counter()
        meta_dir, hf_dir, n_bytes = write_checkpoints(opt.preset, root, opt.seed)
        print(f"wrote {opt.preset} checkpoints ({n_bytes / 1e9:.2f} GB of bf16 weights each) to {root} "
              f"in {time.perf_counter() - t:.0f}s", flush=True)
        results = {"preset": opt.preset, "dtype": opt.dtype, "cases": []}
        for loader, layout in CASES:
            path = meta_dir if layout == "meta" else hf_dir
            proc = subprocess.run([sys.executable, __file__, "--child", loader, str(path), "--dtype", opt.dtype],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"{loader} / {layout} load failed:\n{proc.stderr[-4000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r |= {"loader": loader, "layout": layout}
            results["cases"].append(r)
            print(f"  {loader:20s} {layout:5s} peak +{(r['peak_load_kb'] - r['baseline_kb']) / 2**20:.2f} GiB "
                  f"during load, +{(r['peak_forward_kb'] - r['baseline_kb']) / 2**20:.2f} GiB after a forward, "
                  f"{r['load_s']:.1f}s", flush=True)
    finally:
        if not opt.dir:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"{opt.preset} loaded as {opt.dtype} on CPU, each in a fresh process; peak resident set above the "
          f"process's baseline after imports, as a multiple of the loaded weights' bytes")
    print("| loader | layout | weights GB | load s | peak during load | x weights | peak after 1st forward "
          "| x weights | of which file-backed (peak) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["cases"]:
        w = r["weights_bytes"]
        load = (r["peak_load_kb"] - r["baseline_kb"]) * 1024
        fwd = (r["peak_forward_kb"] - r["baseline_kb"]) * 1024
        r |= {"peak_load_ratio": load / w, "peak_forward_ratio": fwd / w}
        print(f"| {r['loader']} | {r['layout']} | {w / 1e9:.2f} | {r['load_s']:.1f} | {load / 1e9:.2f} GB | "
              f"{load / w:.2f}x | {fwd / 1e9:.2f} GB | {fwd / w:.2f}x | "
              f"{(r['peak_file_kb'] - r['baseline_file_kb']) * 1024 / 1e9:.2f} GB |")
    if opt.json:
        Path(opt.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
