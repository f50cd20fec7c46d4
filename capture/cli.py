"""Entry points of ``llama3-sae capture`` and ``llama3-sae preprocess`` (also ``python -m capture`` and
``torchrun --nproc-per-node N -m capture``): parse the typed config, call the library, print a summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from apps.config import add_dataclass_args, from_namespace

from .config import CaptureConfig, PreprocessConfig

_CAPTURE_EPILOG = """\
examples:
  llama3-sae capture --ckpt-dir ~/models/Llama-3.2-1B --data sentences.parquet --sites L8R --out acts
  torchrun --nproc-per-node 4 -m capture --ckpt-dir DIR --data DIR --sites L8R,L8A --out acts
Re-running the same command after a kill resumes it; a finished capture is left as it is.
"""


def _parse(cls: type, argv: list[str] | None, prog: str, description: str, epilog: str = "") -> object:
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON file with option values (names as in --help, with underscores); "
                             "options on the command line override it")
    add_dataclass_args(parser, cls)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    config_path = pre.parse_known_args(argv)[0].config
    base = None
    if config_path is not None:
        try:
            base = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--config {config_path}: {e}")
        if not isinstance(base, dict):
            parser.error(f"--config {config_path}: expected a JSON object of option values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(base) - known)
        if unknown:
            parser.error(f"--config {config_path}: unknown options {unknown}; known: {sorted(known)}")
        for action in parser._actions:  # options the file gives are no longer required on the command line
            if action.dest in base:
                action.required = False
    ns = parser.parse_args(argv)
    return from_namespace(cls, ns, base)


def main_capture(argv: list[str] | None = None, prog: str = "llama3-sae capture") -> int:
    from .capture import format_summary, run_capture

    try:
        cfg = _parse(CaptureConfig, argv, prog, "Store a model's activations at hook sites for every token of a "
                     "text or chat dataset: one store per site, sharded safetensors.", _CAPTURE_EPILOG)
        summary = run_capture(cfg)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return 0


def main_preprocess(argv: list[str] | None = None, prog: str = "llama3-sae preprocess") -> int:
    from .preprocess import format_summary, run_preprocess

    try:
        cfg = _parse(PreprocessConfig, argv, prog, "Per-dimension mean/variance (float64) and mean norm of an "
                     "activation store, and a globally shuffled copy for training.")
        summary = run_preprocess(cfg)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
