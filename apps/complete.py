"""``llama3-sae complete``: stream text completions for one or more prompts, batched, optionally steered.

On a terminal the completions grow live in one view, with a panel of the top active SAE latents (and
their labels) at the latest token of each prompt when ``--sae`` is given. Piped, the text is printed plainly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text

from llama3_sae.config import parse_config
from .engine import Engine, ModelOptions, SaeOptions, Sampling, SamplingOptions
from .terminal import StreamView, describe_edit, make_console


@dataclass
class CompleteConfig(SamplingOptions, SaeOptions, ModelOptions):
    prompts: list[str] = field(default_factory=list)
    """Prompts to complete, batched together."""
    prompts_file: Path | None = None
    """A file with one prompt per line (blank lines skipped), added after the positional prompts; - reads
    standard input."""
    bos: bool | None = None
    """Start each prompt with the model's BOS token (--bos / --no-bos); default: as the SAE's training data was
    captured, else the model's own rule (Llama 3 yes, SmolLM2 no). An override that differs from the SAE's
    training data is reported."""
    fps: float = 12.0
    """Most screen refreshes per second of the live view (a terminal only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")

    def all_prompts(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompts_file is not None:
            if str(self.prompts_file) == "-":
                text = sys.stdin.read()
            elif self.prompts_file.is_file():
                text = self.prompts_file.read_text(encoding="utf-8")
            else:
                raise SystemExit(f"--prompts-file {self.prompts_file}: no such file")
            prompts += [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise SystemExit("no prompts: give them as arguments or with --prompts-file")
        return prompts


def run_complete(cfg: CompleteConfig, console: Console | None = None) -> list[str]:
    """Load, check, stream and show; returns the completions' texts."""
    prompts = cfg.all_prompts()
    console = console or make_console()
    engine = Engine.load(cfg, cfg.sae, cfg.site, max_batch_size=len(prompts))
    edits = engine.parse_edits(cfg.steer, cfg.steer_when)
    tokens = engine.encode_prompts(prompts, bos=cfg.bos)  # errors (too long, ...) before anything is drawn
    note = engine.bos_note(cfg.bos)
    if note:
        make_console(stderr=True).print(Text(note))
    if edits:
        # On stderr, so a piped stdout holds only the completions.
        make_console(stderr=True).print(Text("steering: " + "; ".join(describe_edit(e, engine.catalog) for e in edits)))
    view = StreamView(console, prompts, catalog=engine.catalog, edits=edits, show_latents=cfg.latents > 0,
                      fps=cfg.fps)
    return view.run(engine.stream(tokens, Sampling.of(cfg), edits, top_latents=cfg.latents))


def main_complete(argv: list[str] | None = None, prog: str = "llama3-sae complete") -> int:
    cfg = parse_config(CompleteConfig, argv, prog, __doc__, usage_errors=True,
                       positional={"prompts": "prompts to complete, batched together"},
                       epilog="example:\n  llama3-sae complete --ckpt-dir DIR --sae SAE_DIR \"The delegates gathered at "
                              "the\" --steer 896=20 --seed 42")
    run_complete(cfg)
    return 0
