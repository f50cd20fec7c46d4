"""Entry points of ``llama3-sae capture`` and ``llama3-sae preprocess`` (also ``python -m capture`` and
``torchrun --nproc-per-node N -m capture``): parse the typed config, call the library, print a summary."""

from __future__ import annotations

import os

from llama3_sae.config import parse_config
from llama3_sae.errors import USER_ERRORS, print_error

from . import capture, preprocess
from .config import CaptureConfig, PreprocessConfig

_CAPTURE_EPILOG = """\
examples:
  llama3-sae capture --ckpt-dir ~/models/Llama-3.2-1B --data sentences.parquet --sites L8R --out acts
  torchrun --nproc-per-node 4 -m capture --ckpt-dir DIR --data DIR --sites L8R,L8A --out acts
Re-running the same command after a kill resumes it; a finished capture is left as it is.
"""


def main_capture(argv: list[str] | None = None, prog: str = "llama3-sae capture") -> int:
    try:
        cfg = parse_config(CaptureConfig, argv, prog, "Store a model's activations at hook sites for every token of a "
                     "text or chat dataset: one store per site, sharded safetensors.", _CAPTURE_EPILOG)
        summary = capture.run_capture(cfg)  # type: ignore[arg-type]
    except USER_ERRORS as e:
        print_error(prog, e, int(os.environ.get("RANK", "0")))
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(capture.format_summary(summary))
    return 0


def main_preprocess(argv: list[str] | None = None, prog: str = "llama3-sae preprocess") -> int:
    try:
        cfg = parse_config(PreprocessConfig, argv, prog, "Per-dimension mean/variance (float64) and mean norm of an "
                     "activation store, and a globally shuffled copy for training.")
        summary = preprocess.run_preprocess(cfg)  # type: ignore[arg-type]
    except USER_ERRORS as e:
        print_error(prog, e, int(os.environ.get("RANK", "0")))
        return 2
    print(preprocess.format_summary(summary))
    return 0
