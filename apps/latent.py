"""``llama3-sae latent``: a latent's page in the terminal -- label, certainty and scores, density, the top
examples and quantile samples with each token shaded by the activation, and the output tokens the latent
promotes and suppresses (the same page the web app shows; see ``apps.latent_page``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from llama3.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from llama3_sae.config import parse_config
from llama3_sae.devices import DTYPES, DTypeName, resolve_device
from sae import load_sae

from .latent_page import build_page, page_json, page_rich
from .latents import LatentCatalog


@dataclass
class LatentConfig:
    """``llama3-sae latent``: show one latent's page."""

    latent: int = 0
    """The latent's index."""
    sae: Path | None = None
    """SAE directory (with top_examples.jsonl from `llama3-sae top-examples` and latents.jsonl from
    `llama3-sae interpret` for the full page)."""
    ckpt_dir: Path | None = None
    """Model checkpoint, for the output tokens: a .gguf file or a Meta / HF / GGUF directory. Default: the
    built-in SmolLM2-135M-Instruct."""
    site: str | None = None
    """Hook site of the SAE when its files do not say."""
    output_tokens: bool = True
    """Show the tokens the latent's decoder direction promotes and suppresses (--no-output-tokens skips
    loading the model)."""
    top_n: int = 10
    """Top examples shown."""
    per_bin: int = 2
    """Examples shown per activation quantile bin."""
    json: bool = False
    """Print the page's data as JSON instead."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    model_dtype: DTypeName = "fp32"
    """Dtype the model computes in."""

    def __post_init__(self) -> None:
        if self.sae is None:
            raise ValueError("--sae is required: the SAE directory whose latent to show")
        self.sae = Path(self.sae)
        if self.top_n < 0 or self.per_bin < 0:
            raise ValueError(f"--top-n ({self.top_n}) and --per-bin ({self.per_bin}) must be >= 0")


def run_latent(cfg: LatentConfig, console: Console | None = None) -> None:
    console = console or Console()
    device = resolve_device(cfg.device)
    if not Path(cfg.sae).exists():
        raise FileNotFoundError(f"--sae {cfg.sae}: no such file or directory")
    sae = load_sae(cfg.sae, site=cfg.site, device=device)
    catalog = LatentCatalog.from_dir(cfg.sae, sae.cfg.n_latents)
    catalog.check(cfg.latent, what="latent")
    model = tokenizer = None
    if cfg.output_tokens:
        ckpt = resolve_checkpoint(cfg.ckpt_dir)
        model = load_model(ckpt, device=device, dtype=DTYPES[cfg.model_dtype])
        tokenizer = load_tokenizer(ckpt)
        if model.params.dim != sae.cfg.d_model:
            raise ValueError(f"the SAE reads d_model={sae.cfg.d_model} but the model in {ckpt} has dim="
                             f"{model.params.dim}; pass the SAE's model with --ckpt-dir (or --no-output-tokens)")
    page = build_page(cfg.latent, catalog, sae=sae, model=model, tokenizer=tokenizer)
    if cfg.json:
        print(json.dumps(page_json(page, top_n=cfg.top_n), ensure_ascii=False, indent=2))
        return
    console.print(page_rich(page, top_n=cfg.top_n, per_bin=cfg.per_bin))
    if page.examples is None:
        console.print(f"(no top examples: run `llama3-sae top-examples --sae {cfg.sae}` for examples and density)",
                      style="dim")


def main_latent(argv: list[str] | None = None, prog: str = "llama3-sae latent") -> int:
    cfg = parse_config(LatentConfig, argv, prog, __doc__, usage_errors=True,
                       positional={"latent": "the latent's index"},
                       epilog="example:\n  llama3-sae latent --sae demo_out/sae 123")
    run_latent(cfg)
    return 0
