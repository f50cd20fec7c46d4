"""``llama3-sae complete``: stream text completions for one or more prompts."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from llama3 import Llama

from .common import DTYPES, DTypeName, resolve_device
from .config import add_dataclass_args, from_namespace


@dataclass
class CompleteConfig:
    ckpt_dir: Path
    """Checkpoint directory: Meta layout (params.json, consolidated.*.pth, tokenizer.model) or HF layout
    (config.json, *.safetensors, tokenizer.model or original/tokenizer.model)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts to complete, batched together."""
    prompts_file: Path | None = None
    """A file with one prompt per line (blank lines skipped), added after the positional prompts."""
    temperature: float = 0.6
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 0.9
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Random seed; row i of the batch samples with seed + i. Unset: nondeterministic."""
    max_new_tokens: int = 64
    """Most tokens generated per prompt (fewer if a stop token comes first)."""
    max_seq_len: int = 2048
    """Context length of the KV cache (prompt + completion)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when available)."""
    dtype: DTypeName = "bf16"
    """Weight and activation dtype."""
    bos: bool = True
    """Start each prompt with <|begin_of_text|>."""
    compile: bool = False
    """torch.compile the decode step: faster decoding after a compile of a few seconds to minutes."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def all_prompts(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompts_file is not None:
            if not self.prompts_file.is_file():
                raise SystemExit(f"--prompts-file {self.prompts_file}: no such file")
            prompts += [line.rstrip("\n") for line in self.prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit("no prompts: give them as arguments or with --prompts-file")
        return prompts


def stream_to_console(llm: Llama, prompts: list[str], *, temperature: float, top_p: float, max_new_tokens: int,
                      seed: int | None, bos: bool = True, console: Console | None = None) -> list[str]:
    """Stream completions of ``prompts``: live panels on a terminal, plain text otherwise. Returns the texts."""
    console = console or Console()
    steps = llm.stream_text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_new_tokens,
                                       seed=seed, bos=bos)
    texts = [""] * len(prompts)
    if not console.is_terminal:
        out = sys.stdout
        single = len(prompts) == 1
        if single:
            out.write(prompts[0])
        for step in steps:
            for i, d in enumerate(step.deltas):
                texts[i] += d
            if single and step.deltas[0]:
                out.write(step.deltas[0])
                out.flush()
        if single:
            out.write("\n")
        else:
            for i, p in enumerate(prompts):
                out.write(f"[{i}] {p}{texts[i]}\n")
        out.flush()
        return texts

    def render() -> Panel | Text:
        blocks = Text()
        for i, p in enumerate(prompts):
            if i:
                blocks.append("\n\n")
            blocks.append(p, style="bold")
            blocks.append(texts[i])
        return Panel(blocks, title="completions", border_style="cyan")

    with Live(render(), console=console, refresh_per_second=12) as live:
        for step in steps:
            for i, d in enumerate(step.deltas):
                texts[i] += d
            live.update(render())
    return texts


def main_complete(argv: list[str] | None = None, prog: str = "llama3-sae complete") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_dataclass_args(parser, CompleteConfig, skip=("prompts",))
    parser.add_argument("prompts", nargs="*", help="prompts to complete, batched together")
    ns = parser.parse_args(argv)
    try:
        cfg = from_namespace(CompleteConfig, ns)
    except ValueError as e:
        parser.error(str(e))
    prompts = cfg.all_prompts()
    llm = Llama.build(cfg.ckpt_dir, max_seq_len=cfg.max_seq_len, max_batch_size=len(prompts),
                      device=resolve_device(cfg.device), dtype=DTYPES[cfg.dtype], compile=cfg.compile)
    stream_to_console(llm, prompts, temperature=cfg.temperature, top_p=cfg.top_p,
                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, bos=cfg.bos)
    return 0
