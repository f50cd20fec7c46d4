"""The built-in tiny model and ``llama3-sae demo``.

The tiny model has the Llama 3 architecture and the real 128,256-token Llama 3 tokenizer (the
``tokenizer.model`` file shipped in Meta's ``llama-models`` package), with seeded random weights at
tiny widths. It is written once in Meta's checkpoint layout to a cache directory and reused, so the
demo runs on a fresh machine with no downloads. Random weights produce word salad: the demo shows the
machinery (loading, hooks, streaming), not language ability.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama3 import Llama, ModelArgs, Transformer
from llama3.model import init_random_weights

from .config import add_dataclass_args, from_namespace

TINY_PRESET = "tiny"
TINY_SEED = 0
# Bump when the tiny model's recipe changes, so stale caches are rebuilt rather than reused.
TINY_VERSION = 1


def cache_root() -> Path:
    """``$LLAMA3_SAE_CACHE``, else ``$XDG_CACHE_HOME/llama3-sae``, else ``~/.cache/llama3-sae``."""
    if os.environ.get("LLAMA3_SAE_CACHE"):
        return Path(os.environ["LLAMA3_SAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama3-sae"


def tiny_checkpoint_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root()) / f"tiny-llama3-v{TINY_VERSION}"


def write_tiny_checkpoint(out_dir: Path, tokenizer_path: Path | None = None) -> Path:
    """Write the tiny model (Meta layout: params.json, consolidated.00.pth, tokenizer.model) to ``out_dir``."""
    from llama3.checkpoint import save_meta_checkpoint
    from llama3.tokenizer import default_tokenizer_path

    tokenizer_path = tokenizer_path or default_tokenizer_path()
    model = Transformer(ModelArgs.preset(TINY_PRESET))
    init_random_weights(model, seed=TINY_SEED, std=0.02)
    model.to(torch.bfloat16)
    save_meta_checkpoint(model, out_dir, tokenizer_path=tokenizer_path)
    return out_dir


def ensure_tiny_checkpoint(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """The tiny checkpoint's directory, written on first use (atomically: a killed write leaves no half model)."""
    target = tiny_checkpoint_dir(cache_dir)
    marker = target / "tiny.json"
    if marker.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_tiny_checkpoint(tmp)
        (tmp / "tiny.json").write_text(json.dumps({"preset": TINY_PRESET, "seed": TINY_SEED,
                                                    "version": TINY_VERSION}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class TinyModelConfig:
    cache_dir: Path | None = None
    """Where to keep the tiny model (default: $LLAMA3_SAE_CACHE or ~/.cache/llama3-sae)."""
    force: bool = False
    """Rewrite the checkpoint even if it is cached."""


def main_tiny_model(argv: list[str] | None = None, prog: str = "llama3-sae tiny-model") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Write (or find) the built-in tiny Llama 3 checkpoint "
                                     "in Meta layout and print its directory.")
    add_dataclass_args(parser, TinyModelConfig)
    cfg = from_namespace(TinyModelConfig, parser.parse_args(argv))
    print(ensure_tiny_checkpoint(cfg.cache_dir, force=cfg.force))
    return 0


@dataclass
class DemoConfig:
    prompts: list[str] = field(default_factory=lambda: ["The delegates gathered at the",
                                                        "Senior diplomats met to discuss"])
    """Prompts to complete."""
    max_new_tokens: int = 32
    """Tokens generated per prompt."""
    temperature: float = 0.8
    """Sampling temperature (0 = greedy)."""
    top_p: float = 0.9
    """Nucleus sampling threshold."""
    seed: int = 42
    """Random seed."""
    cache_dir: Path | None = None
    """Where the tiny model is cached (default: $LLAMA3_SAE_CACHE or ~/.cache/llama3-sae)."""


def main_demo(argv: list[str] | None = None, prog: str = "llama3-sae demo") -> int:
    from rich.console import Console

    from .complete import stream_to_console

    parser = argparse.ArgumentParser(prog=prog, description="Stream completions from the built-in tiny Llama 3 "
                                     "model (random weights, real tokenizer; nothing is downloaded).")
    add_dataclass_args(parser, DemoConfig)
    cfg = from_namespace(DemoConfig, parser.parse_args(argv))
    console = Console(stderr=True)
    ckpt = ensure_tiny_checkpoint(cfg.cache_dir)
    console.print(f"[bold]tiny model[/bold]: {ckpt} (random weights: expect word salad)")
    llm = Llama.build(ckpt, max_seq_len=256, max_batch_size=len(cfg.prompts), device="cpu", dtype=torch.float32)
    stream_to_console(llm, cfg.prompts, temperature=cfg.temperature, top_p=cfg.top_p,
                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    return 0
