"""What the app tests share: a small model checkpoint and an SAE directory with top examples and labels.

Built once per test session (cached in pytest's session temp folder, so every ``test_apps*`` module
reuses it) through the real stages: the SAE's examples come from ``interpret.examples.run_top_examples``
and its labels from the local heuristic. The model is the tiny preset with seeded random weights (fast
to write; the demo's trained tiny model is exercised by ``test_cli``'s demo test).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SENTENCES = REPO / "capture" / "data" / "sentences.txt"
SITE = "L2R"
N_LATENTS = 64
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\r")


@dataclass(frozen=True)
class AppsEnv:
    ckpt: Path
    sae: Path


def build_env(root: Path) -> AppsEnv:
    """The checkpoint and SAE under ``root`` (made on the first call, then reused)."""
    from helpers import LLAMA3_TOKENIZER_PATH

    from interpret import heuristic_labels
    from interpret.examples import TopExamplesConfig, run_top_examples
    from llama3 import ModelArgs, Transformer
    from llama3.checkpoint import save_meta_checkpoint
    from llama3.model import init_random_weights
    from sae import SAEConfig, SparseAutoencoder

    marker = root / "ready.json"
    env = AppsEnv(root / "ckpt", root / "sae")
    if marker.is_file():
        return env
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    model = Transformer(ModelArgs.preset("tiny"))
    init_random_weights(model, seed=0, std=0.02)
    save_meta_checkpoint(model, env.ckpt, tokenizer_path=LLAMA3_TOKENIZER_PATH)
    # An untrained SAE with Llama Scope's dataset normalisation fitted to the site's activations, so its
    # activations (and so the steering sliders' ranges) have the size a trained SAE's would.
    sae = SparseAutoencoder(SAEConfig(d_model=64, n_latents=N_LATENTS, k=4, site=SITE, model_name="tiny-random",
                                      normalization="dataset"), seed=0)
    from llama3.tokenizer import Tokenizer

    tok = Tokenizer(LLAMA3_TOKENIZER_PATH)
    model.set_hooks([SITE], None)
    with torch.no_grad():
        acts = [model.forward_activations(torch.tensor([tok.encode(line, bos=False, eos=False)]))[SITE][0]
                for line in SENTENCES.read_text().splitlines()[:100] if line.strip()]
    sae.fit_dataset_norm(torch.cat(acts).float())
    sae.save(env.sae)
    run_top_examples(TopExamplesConfig(ckpt_dir=env.ckpt, sae=env.sae, data=(SENTENCES,), device="cpu",
                                       model_dtype="fp32", top_n=5, progress=False))
    heuristic_labels(env.sae)
    marker.write_text(json.dumps({"ok": True}))
    return env


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m apps`` children: the repository importable, a colour terminal."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NO_COLOR", None)
    env["TERM"] = "xterm-256color"
    env["COLUMNS"], env["LINES"] = "160", "60"
    env["OMP_NUM_THREADS"] = "1"  # tiny matrices: one thread is faster, much faster on a busy machine
    return env
