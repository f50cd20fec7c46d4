"""Entry points of ``llama3-sae train`` / ``llama3-sae eval``; ``python -m training`` and
``torchrun --nproc-per-node N -m training`` call the same ``main_train``. Parse the typed config, call
the library, print a summary."""

from __future__ import annotations

import os
import sys

from llama3_sae.config import parse_config
from llama3_sae.errors import USER_ERRORS, print_error

from .config import TrainConfig
from . import eval as sae_eval
from . import inspect as sae_inspect
from .eval import EvalConfig
from .inspect import InspectConfig
from .run import run_train

_TRAIN_EPILOG = """\
examples:
  llama3-sae preprocess --store acts/L8R                      # statistics + shuffled copy, once
  llama3-sae train --store acts/L8R/shuffled --out saes/L8R --n-latents 32768 --k 64
  torchrun --nproc-per-node 4 -m training --store acts/L8R/shuffled --out saes/L8R            # DDP
  torchrun --nproc-per-node 4 -m training --store ... --out ... --model-parallel 2             # 2 x 2
  llama3-sae train --config saes/L8R/train_config.json --out saes/L8R-again                    # same options
Re-running the same command after a kill resumes from the newest checkpoint.
"""

_EVAL_EPILOG = """\
examples:
  llama3-sae eval --sae saes/L8R --ckpt-dir ~/models/Llama-3.2-1B --data heldout.txt --out eval/L8R
  llama3-sae eval --sae saes/L4R saes/L8R saes/L12R --ckpt-dir DIR --data heldout.jsonl --out eval/all
"""


def main_train(argv: list[str] | None = None, prog: str = "llama3-sae train") -> int:
    try:
        cfg = parse_config(TrainConfig, argv, prog, "Train a TopK sparse autoencoder on an activation store "
                           "(one process, DDP under torchrun, or latent-sharded with --model-parallel).",
                           _TRAIN_EPILOG)
        result = run_train(cfg)
    except USER_ERRORS as e:
        print_error(prog, e, int(os.environ.get("RANK", "0")))
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        val = result.summary.get("val", {})
        print(f"trained {result.steps:,} steps -> {result.out}  (val L0 {val.get('l0', float('nan')):.1f}, "
              f"explained variance {val.get('explained_variance', float('nan')):.4f}, "
              f"dead {val.get('dead_fraction', float('nan')):.2%})")
        print(f"next: llama3-sae eval --sae {result.out} --data HELD_OUT.txt --out EVAL_DIR  (delta LM loss, "
              f"fidelity); llama3-sae top-examples --sae {result.out} --data TEXT  (then interpret, latent, ui)")
    return 0


def main_eval(argv: list[str] | None = None, prog: str = "llama3-sae eval") -> int:
    try:
        cfg = parse_config(EvalConfig, argv, prog, "Evaluate SAEs on held-out text: L0, explained variance, "
                           "dead fraction, and the language-model loss with each SAE spliced into the model "
                           "(delta loss, fidelity). Writes eval.json and eval.png.", _EVAL_EPILOG)
        report = sae_eval.run_eval(cfg)
    except USER_ERRORS as e:
        print_error(prog, e, int(os.environ.get("RANK", "0")))
        return 2
    print(sae_eval.format_report(report))
    return 0


_INSPECT_EPILOG = """\
examples:
  llama3-sae inspect-sae downloads/Llama3_1-8B-Base-L15R-8x            # a Llama Scope release directory
  llama3-sae inspect-sae saes/L8R --store acts/L8R                     # plus L0 / explained variance
  llama3-sae inspect-sae Llama-3.1-8B-Instruct-SAE-l19.pth --site L19R  # Goodfire: name the site
  llama3-sae inspect-sae saes/L6TC --store acts/L6MI --target-store acts/L6M   # a transcoder
"""


def main_inspect(argv: list[str] | None = None, prog: str = "llama3-sae inspect-sae") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # llama3-sae inspect-sae PATH [options]
        argv = ["--sae", *argv]
    try:
        cfg = parse_config(InspectConfig, argv, prog, "Show what the loader understood about an SAE (layout, "
                           "architecture, site, model, normalisation and its factors, threshold space, code scale) "
                           "and, with --store, its L0 and explained variance on those activations.", _INSPECT_EPILOG)
        report = sae_inspect.run_inspect(cfg)
    except USER_ERRORS as e:
        print_error(prog, e, int(os.environ.get("RANK", "0")))
        return 2
    print(sae_inspect.report_json(report) if cfg.json else sae_inspect.format_report(report))
    return 0
