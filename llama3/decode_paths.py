"""How the one-token decode step runs, chosen by measuring the candidates on this machine.

The fastest way to run a decode step depends on the CPU (AVX2 vs AVX-512 vs AMX), the dtype, the batch and
the model's widths: the compiled step that is 2.4x eager on one CPU is slower than eager on another. So a
``DecodePath`` is picked per (machine, torch version, model shape, dtype, batch): each candidate runs a few
decode steps of a *calibration model* (random weights, the model's widths, the KV cache's length, enough
layers that the weights do not fit in cache), the fastest exact candidate wins, and the choice is cached in
``cache_root()/decode-paths.json`` and printed once. ``Llama(..., decode_path=NAME)`` forces one.

Candidates:

* ``eager`` -- the model as written.
* ``swapped`` -- eager, but products with few rows (a decode step) run as ``(W @ x.T).T``: with the weight
  as the row-major left operand, the CPU GEMM streams it once instead of once per row block; 1.5-3x faster
  for fp32 at batch 4-16 on an AVX2 EPYC, no help at batch 1 or in bf16 (``benchmarks/RESULTS.md``).
* ``compiled`` -- torch.compile of one transformer block (the same graph serves every layer, so compiling
  takes seconds, not minutes) and of the output head, with ``llama3.compilation``'s CPU decompositions
  (matrix-vector products as streaming reductions); blocks that hold a hook (stored activations, an SAE
  function, steering) run eagerly, so hooks never recompile anything.
* ``inductor`` -- the same regional compilation with inductor's defaults.
* ``onednn`` -- eager with every linear through oneDNN on a prepacked copy of its weight (twice the weight
  memory; the path AMX machines were expected to like). Timed, used only when forced.
* ``int8`` -- int8 weight-only linears (``llama3.quant``): half the bytes of bf16 but lossy, so timed and
  used only when forced; forcing it quantises the model in place.

Paths change how the step is computed, never the model's parameters (except ``int8``): outputs equal the
eager model's up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from llama3_sae.devices import cpu_name
from llama3_sae.files import atomic_write_json
from llama3_sae.paths import cache_root

from .compilation import SWAP_MAX_ROWS, cpu_decode_backend
from .model import Transformer, TransformerBlock, init_random_weights
from .quant import quantize_int8

DecodePathName = Literal["auto", "eager", "swapped", "compiled", "inductor", "onednn", "int8"]
PATHS: tuple[str, ...] = ("eager", "swapped", "compiled", "inductor", "onednn", "int8")
AUTO_CANDIDATES: tuple[str, ...] = ("eager", "swapped", "compiled", "inductor")
"""Exact paths that keep the model's weights as they are: the ones ``auto`` chooses from."""
FORCED_ONLY = {"onednn": "a packed copy of the weights", "int8": "lossy"}
"""Timed but chosen only when forced, and why."""

# The calibration model gets enough layers for this many weight bytes, so that its weights stream from
# memory as the real model's do (one small block would sit in the CPU's cache and look fast).
_CALIBRATION_BYTES = 256 * 2**20
CACHE_VERSION = 2


# --------------------------------------------------------------------------- the machine
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()} x{os.cpu_count()}"


# --------------------------------------------------------------------------- the step, region by region
def kv_bucket(pos: int, cache_len: int) -> int:
    """How many cache positions a compiled step at ``pos`` attends over: the next power of two (at least 256)
    that covers it, so a step reads a short cache early on and there are only a few graphs."""
    return min(cache_len, max(256, 1 << pos.bit_length()))


def _run_blocks(model: Transformer, h: torch.Tensor, pos: int, block: Callable | None,
                acts: dict | None) -> torch.Tensor:
    if block is None:
        cos, sin = model.rope_at(pos, h.shape[1])
        for layer in model.layers:
            h = layer(h, cos, sin, pos, True, acts)
        return h
    pos_t = torch.tensor(pos, device=h.device)
    cos, sin = model.rope_at(pos_t, h.shape[1])
    kv_len = kv_bucket(pos, model.cache_shape[1])
    for layer in model.layers:
        if layer.store_points or layer.fns:  # a hooked block runs as written
            h = layer(h, cos, sin, pos, True, acts)
        else:
            h = block(layer, h, cos, sin, pos_t, kv_len)
    return h


def _head(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    return model.output(model.norm(h)).float()


def _block_forward(layer: TransformerBlock, h, cos, sin, pos, kv_len: int):
    return layer(h, cos, sin, pos, True, None, kv_len)


class DecodeStep:
    """``step(tokens [B, 1], pos) -> logits [B, 1, vocab]`` for one path (``blocks`` and ``head`` are its two
    halves, timed apart by the calibration)."""

    def __init__(self, model: Transformer, name: str, block: Callable | None = None,
                 head: Callable | None = None, linear: Callable | None = None):
        self.model, self.name = model, name
        self._block, self._head = block, head or _head
        self._linear = linear

    def _scope(self) -> contextlib.AbstractContextManager:
        return _LinearMode(self._linear) if self._linear is not None else contextlib.nullcontext()

    def blocks(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        with self._scope():
            return self._blocks(tokens, pos)

    def _blocks(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        model = self.model
        # Compiled blocks take the static-shape path (a tensor position, attention over a power-of-two
        # prefix of the cache: one graph per prefix length); eager ones over the filled part only.
        pos = int(pos)
        model.check_input(tokens, pos)
        acts: dict | None = {} if model.store_sites else None
        h = _run_blocks(model, model.tok_embeddings(tokens), pos, self._block, acts)
        if acts is not None:
            model.activations = acts
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        with self._scope():
            return self._head(self.model, h)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        return self.head(self.blocks(tokens, pos))


class _LinearMode(TorchFunctionMode):
    """Routes ``F.linear`` to ``impl(x, weight)`` while active (only inside a ``DecodeStep``, so prefills,
    captures and gradient passes through the same modules stay plain); ``impl`` may decline with None.
    Nothing on the model changes, so several paths can share one model."""

    def __init__(self, impl: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]):
        super().__init__()
        self.impl = impl

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and (len(args) < 3 or args[2] is None) and kwargs.get("bias") is None:
            out = self.impl(args[0], args[1])
            if out is not None:
                return out
        return func(*args, **kwargs)


def _swapped_linear(x: torch.Tensor, weight: torch.Tensor, max_rows: int | None = SWAP_MAX_ROWS) -> torch.Tensor | None:
    rows = x.numel() // weight.shape[1]
    if (max_rows is not None and rows > max_rows) or x.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    return torch.mm(weight, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], weight.shape[0])


class _OneDnnLinear:
    """``F.linear`` through oneDNN on a packed copy of each weight, made at first use."""

    def __init__(self) -> None:
        self.packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        entry = self.packed.get(id(weight))
        if entry is None or entry[0] is not weight:
            entry = self.packed[id(weight)] = (weight, weight.detach().to_mkldnn())
        x2 = x.reshape(-1, weight.shape[1]).contiguous()
        y = torch._C._nn.mkldnn_linear(x2.to_mkldnn(), entry[1], None).to_dense()
        return y.reshape(*x.shape[:-1], weight.shape[0])


PREFILL_PATHS: tuple[str, ...] = ("eager", "swapped")
"""How a prompt's forward runs: as written, or with every fp32 CPU product as ``(W @ x.T).T`` (1.1-1.9x
faster per product at 32-128 rows on the AVX2 EPYC here; a no-op in other dtypes)."""


def prefill_scope(name: str) -> contextlib.AbstractContextManager:
    """The context a prefill of path ``name`` runs in."""
    if name == "swapped":
        return _LinearMode(functools.partial(_swapped_linear, max_rows=None))
    if name == "eager":
        return contextlib.nullcontext()
    raise ValueError(f"unknown prefill path {name!r}; expected one of {', '.join(PREFILL_PATHS)}")


def build_step(model: Transformer, name: str) -> DecodeStep:
    """The decode step of path ``name`` for ``model`` (``int8`` quantises ``model`` in place)."""
    device = model.tok_embeddings.weight.device
    if name == "eager":
        return DecodeStep(model, name)
    if name == "swapped":
        return DecodeStep(model, name, linear=_swapped_linear)
    if name in ("compiled", "inductor"):
        if name == "compiled" and device.type == "cpu":
            opts: dict = {"backend": cpu_decode_backend}
        elif device.type == "cuda":
            opts = {"mode": "max-autotune-no-cudagraphs"}
        else:
            opts = {}
        block = torch.compile(_block_forward, fullgraph=True, dynamic=False, **opts)
        return DecodeStep(model, name, block=block, head=torch.compile(_head, fullgraph=True, dynamic=False, **opts))
    if name == "onednn":
        if device.type != "cpu" or not torch.backends.mkldnn.is_available():
            raise ValueError("the onednn decode path needs a CPU build of torch with oneDNN (mkldnn)")
        return DecodeStep(model, name, linear=_OneDnnLinear())
    if name == "int8":
        quantize_int8(model)
        return DecodeStep(model, name)
    raise ValueError(f"unknown decode path {name!r}; expected auto or one of {', '.join(PATHS)}")


# --------------------------------------------------------------------------- calibration
@dataclass
class DecodeChoice:
    path: str
    """The chosen path."""
    step_ms: dict[str, float | None]
    """Estimated milliseconds per decode step of the whole model, per candidate (None: it failed here)."""
    notes: dict[str, str]
    """Why a candidate failed, by name."""
    batch: int
    seconds: float
    """How long the calibration took (compiles included)."""
    prefill: str = "eager"
    """The chosen prefill path (``PREFILL_PATHS``)."""
    prefill_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    """Milliseconds of a calibration prefill (128 tokens per row), per prefill path."""
    cached: bool = False

    def describe(self) -> str:
        def one(name: str) -> str:
            ms = self.step_ms.get(name)
            if ms is None:
                return f"{name} failed"
            tag = f" ({FORCED_ONLY[name]}: forced only)" if name in FORCED_ONLY else ""
            return f"{name} {1000 / ms * self.batch:.1f}{tag}"
        others = "; ".join(one(n) for n in self.step_ms if n != self.path)
        how = "cached choice" if self.cached else f"measured in {self.seconds:.0f} s"
        prefill = ""
        if self.prefill != "eager" and self.prefill_ms.get("eager"):
            prefill = f"; prefill {self.prefill} ({self.prefill_ms['eager'] / self.prefill_ms[self.prefill]:.2f}x eager)"
        return (f"decode path for batch {self.batch}: {self.path} ({1000 / self.step_ms[self.path] * self.batch:.1f} "
                f"tok/s; {others} tok/s){prefill}, {how}; --decode-path NAME forces one")


def shape_key(model: Transformer, batch: int) -> str:
    """What a choice depends on: machine, torch, threads, model widths, dtype, cache length, batch."""
    p, w = model.params, model.tok_embeddings.weight
    cache = model.cache_shape
    seq = cache[1] if cache else model.max_seq_len
    return (f"{device_name(w.device)}|torch {torch.__version__}|threads {torch.get_num_threads()}|"
            f"dim {p.dim} layers {p.n_layers} heads {p.n_heads}/{p.n_kv_heads} hidden {p.hidden_dim} "
            f"vocab {p.vocab_size} tied {bool(p.tie_word_embeddings)}|{str(w.dtype).removeprefix('torch.')}|"
            f"seq {seq}|batch {batch}")


def _calibration_model(model: Transformer, batch: int, seq: int) -> tuple[Transformer, int]:
    p, w = model.params, model.tok_embeddings.weight
    layer_bytes = sum(t.numel() for t in model.layers[0].parameters()) * w.element_size()
    n_cal = min(p.n_layers, max(2, math.ceil(_CALIBRATION_BYTES / max(layer_bytes, 1))))
    cal = Transformer(dataclasses.replace(p, n_layers=n_cal, max_seq_len=max(seq, p.max_seq_len)))
    cal = init_random_weights(cal.to(device=w.device, dtype=w.dtype), seed=0).eval()
    cal.init_rope(w.device)
    cal.setup_cache(batch, seq)
    return cal, n_cal


def _time(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


@torch.inference_mode()
def calibrate(model: Transformer, batch: int, candidates: Sequence[str] = PATHS, rounds: int = 3,
              steps: int = 3) -> DecodeChoice:
    """Time each candidate on a calibration model shaped like ``model`` at ``batch`` rows; the fastest of
    ``AUTO_CANDIDATES`` wins. Rounds alternate the candidates so a busy moment hits them all."""
    start = time.perf_counter()
    cache = model.cache_shape
    seq = cache[1] if cache else min(model.max_seq_len, 2048)
    device = model.tok_embeddings.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens = torch.randint(0, model.params.vocab_size, (batch, 1), device=device)
    pos = min(128, seq - 2)
    notes: dict[str, str] = {}
    runs: dict[str, tuple[DecodeStep, Transformer, int]] = {}
    shared = _calibration_model(model, batch, seq)  # the paths that leave the weights alone share one
    for name in candidates:
        try:
            cal, n_cal = _calibration_model(model, batch, seq) if name == "int8" else shared
            step = build_step(cal, name)
            for _ in range(2):  # compiles, and touches every page once
                step(tokens, pos)
            runs[name] = (step, cal, n_cal)
        except Exception as e:  # a candidate this machine cannot run is reported, not fatal
            notes[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    blocks: dict[str, list[float]] = {n: [] for n in runs}
    heads: dict[str, list[float]] = {n: [] for n in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            step = runs[name][0]
            for _ in range(steps):
                holder: list[torch.Tensor] = []
                blocks[name].append(_time(lambda: holder.append(step.blocks(tokens, pos)), sync))
                heads[name].append(_time(lambda: step.head(holder[0]), sync))
    step_ms: dict[str, float | None] = {}
    for name in candidates:
        if name not in runs:
            step_ms[name] = None
            continue
        n_cal = runs[name][2]
        est = statistics.median(blocks[name]) * model.params.n_layers / n_cal + statistics.median(heads[name])
        step_ms[name] = round(est * 1000, 3)
    eligible = [n for n in candidates if n in AUTO_CANDIDATES and step_ms.get(n) is not None]
    if not eligible:
        raise RuntimeError(f"no decode path ran on this machine: {notes}")
    best = min(eligible, key=lambda n: step_ms[n])  # type: ignore[arg-type,return-value]
    prefill_ms = _time_prefills(shared[0], batch, min(128, seq - 1), rounds, sync)
    prefill = min(prefill_ms, key=prefill_ms.get) if prefill_ms else "eager"  # type: ignore[arg-type]
    return DecodeChoice(best, step_ms, notes, batch, round(time.perf_counter() - start, 1), prefill, prefill_ms)


def _time_prefills(cal: Transformer, batch: int, length: int, rounds: int, sync: Callable[[], None]) -> dict[str, float]:
    """Milliseconds of a ``length``-token prefill of ``batch`` rows on the calibration model, per prefill path."""
    device = cal.tok_embeddings.weight.device
    if device.type != "cpu" or cal.tok_embeddings.weight.dtype != torch.float32:
        return {}  # the swapped products apply to fp32 on CPU only: nothing to choose
    tokens = torch.randint(0, cal.params.vocab_size, (batch, length), device=device)
    times: dict[str, list[float]] = {n: [] for n in PREFILL_PATHS}
    for r in range(rounds + 1):
        for name in (PREFILL_PATHS if r % 2 == 0 else PREFILL_PATHS[::-1]):
            with prefill_scope(name):
                t = _time(lambda: cal(tokens, 0, last_only=True), sync)
            if r > 0:  # the first round warms up
                times[name].append(t)
    return {n: round(statistics.median(v) * 1000, 3) for n, v in times.items()}


class ChoiceCache:
    """``{shape_key: choice}`` in a JSON file, written atomically; unreadable or old files start empty."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_root() / "decode-paths.json"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data.get("choices", {}) if data.get("version") == CACHE_VERSION else {}

    def get(self, key: str) -> DecodeChoice | None:
        entry = self._read().get(key)
        if entry is None:
            return None
        try:
            return DecodeChoice(**{**entry, "cached": True})
        except TypeError:
            return None

    def put(self, key: str, choice: DecodeChoice) -> None:
        choices = self._read()
        choices[key] = {k: v for k, v in dataclasses.asdict(choice).items() if k != "cached"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"version": CACHE_VERSION, "choices": choices}, fsync=False)


def choose(model: Transformer, batch: int, cache: ChoiceCache | None = None,
           report: Callable[[str], None] | None = None) -> DecodeChoice:
    """The cached choice for this machine and shape, or a fresh calibration (then cached); ``report`` gets
    the one-line summary."""
    cache = cache or ChoiceCache()
    key = shape_key(model, batch)
    choice = cache.get(key)
    if choice is None or choice.path not in AUTO_CANDIDATES:
        choice = calibrate(model, batch)
        cache.put(key, choice)
    (report or _stderr)(choice.describe())
    return choice


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
