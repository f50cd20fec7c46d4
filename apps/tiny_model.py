"""A tiny Llama 3-architecture model for tests: the real 128,256-token Llama 3 tokenizer at tiny widths.

Not the demo model (that is the built-in SmolLM2-135M-Instruct). This one exists so that tests can run
everything that needs the Llama 3 tokenizer (Meta's ``tokenizer.model``, shipped in ``llama-models``) on
a model that loads in milliseconds. It is trained for a few hundred steps on ``capture/data/sentences.txt``
so its activations have structure, written once in Meta's layout to a cache directory and reused.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from llama3 import ModelArgs, Transformer
from llama3.checkpoint import save_meta_checkpoint
from llama3.model import init_random_weights
from llama3.tokenizer import Tokenizer, default_tokenizer_path
from llama3_sae.config import parse_config
from llama3_sae.paths import cache_root

TINY_PRESET = "tiny"
TINY_SEED = 0
# Bump when the tiny model's recipe changes, so stale caches are rebuilt rather than reused.
# v2: trained on the bundled sentences (v1 had random weights).
TINY_VERSION = 2
TINY_TRAIN_STEPS = 400
TINY_BATCH = 32
TINY_LR = 8e-3


def bundled_sentences() -> Path:
    """The sentences shipped with the ``capture`` package (package data, so also in an installed wheel)."""
    import importlib.util

    spec = importlib.util.find_spec("capture")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the capture package is not installed, and with it the bundled sentences")
    path = Path(spec.origin).parent / "data" / "sentences.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llama3-sae")
    return path


def tiny_checkpoint_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root()) / f"tiny-llama3-test-v{TINY_VERSION}"


# --------------------------------------------------------------------------- the tiny model's training
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # The tiny model's matrices are so small that a second thread costs more in synchronisation than it
    # saves (4x slower on a busy 2-core machine); restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny_model(args: ModelArgs, tokenizer, sentences: list[str], *, steps: int = TINY_TRAIN_STEPS,
                     batch_size: int = TINY_BATCH, lr: float = TINY_LR, seed: int = TINY_SEED) -> Transformer:
    """A Transformer of shape ``args`` trained on ``sentences`` (each once with and once without
    <|begin_of_text|>, ending in <|end_of_text|>, so completions stop at the end of a sentence).

    Only the ~2k token ids the sentences use are trained, as a small vocabulary plus one shared "other"
    row; the full 128k-row embedding is assembled afterwards with every other token on that shared row.
    The "other" logit gets + log(number of other tokens) in training, so the full model's softmax
    (where each of them has that logit) gives them the probability the small one learned: about none.
    """
    seqs = []
    for s in sentences:
        ids = tokenizer.encode(s, bos=False, eos=True)
        seqs += [[tokenizer.bos_id, *ids], ids]
    vocab = sorted({t for s in seqs for t in s})
    n_small = len(vocab) + 1  # + the shared "other" row
    small = Transformer(replace(args, vocab_size=n_small))
    init_random_weights(small, seed=seed, std=0.02)
    small.train()
    to_small = torch.full((args.vocab_size,), n_small - 1, dtype=torch.long)
    to_small[torch.tensor(vocab)] = torch.arange(len(vocab))
    lengths = torch.tensor([len(s) for s in seqs])
    padded = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = to_small[torch.tensor(s)]
    log_other = math.log(args.vocab_size - len(vocab))
    opt = torch.optim.AdamW(small.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    with _one_thread():
        for step in range(steps):
            rows = torch.randint(0, len(seqs), (batch_size,), generator=g)
            T = int(lengths[rows].max())
            x = padded[rows, :T]
            real = torch.arange(T)[None] < lengths[rows, None]
            logits = small(x[:, :-1])
            logits[..., -1] += log_other
            keep = real[:, 1:]
            loss = F.cross_entropy(logits[keep], x[:, 1:][keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for group in opt.param_groups:  # cosine to 0
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    full = Transformer(args)
    state = {k: v.detach() for k, v in small.state_dict().items()}
    emb = state["tok_embeddings.weight"]
    big = emb[-1].repeat(args.vocab_size, 1)
    big[torch.tensor(vocab)] = emb[:-1]
    state["tok_embeddings.weight"] = big
    state["output.weight"] = big  # tied
    full.load_state_dict(state)
    return full.eval()


def write_tiny_checkpoint(out_dir: Path, tokenizer_path: Path | None = None) -> Path:
    """Write the tiny model (Meta layout: params.json, consolidated.00.pth, tokenizer.model) to ``out_dir``."""

    tokenizer_path = tokenizer_path or default_tokenizer_path()
    sentences = [line.strip() for line in bundled_sentences().read_text(encoding="utf-8").splitlines() if line.strip()]
    model = train_tiny_model(ModelArgs.preset(TINY_PRESET), Tokenizer(tokenizer_path), sentences,
                             steps=TINY_TRAIN_STEPS, batch_size=TINY_BATCH, lr=TINY_LR, seed=TINY_SEED)
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
        (tmp / "tiny.json").write_text(json.dumps({"preset": TINY_PRESET, "seed": TINY_SEED, "version": TINY_VERSION,
                                                    "train_steps": TINY_TRAIN_STEPS, "batch_size": TINY_BATCH,
                                                    "lr": TINY_LR}) + "\n")
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


def main_tiny_model(argv: list[str] | None = None, prog: str = "llama3-sae test-model") -> int:
    cfg = parse_config(TinyModelConfig, argv, prog, "Write (or find) the tiny Llama 3 test checkpoint (random widths of "
                       "64, the real Llama 3 tokenizer, briefly trained; for tests, not the demo model) in Meta layout "
                       "and print its directory.", usage_errors=True)
    print(ensure_tiny_checkpoint(cfg.cache_dir, force=cfg.force))
    return 0
