"""The built-in tiny model and ``llama3-sae demo``: the whole pipeline on a 2-core CPU in a few minutes.

The tiny model has the Llama 3 architecture and the real 128,256-token Llama 3 tokenizer (the
``tokenizer.model`` file shipped in Meta's ``llama-models`` package) at tiny widths, trained for a few
hundred steps on the bundled sentences (``capture/data/sentences.txt``) so its completions resemble them
and its activations have structure for an SAE to find. It is written once in Meta's checkpoint layout to
a cache directory and reused, so the demo runs on a fresh machine with no downloads.

The demo then runs every stage on it, through the same functions as the commands: capture activations
at one site over the bundled sentences, preprocess (statistics, shuffle), train a small TopK SAE, find
each latent's top examples, label the latents (Claude when ``--llm-labels`` and ANTHROPIC_API_KEY are
given; otherwise a local heuristic, and it says so), pick a latent for a concept and stream completions
without and with steering it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from llama3 import ModelArgs, Transformer
from llama3.model import init_random_weights

from .config import add_dataclass_args, from_namespace

TINY_PRESET = "tiny"
TINY_SEED = 0
# Bump when the tiny model's recipe changes, so stale caches are rebuilt rather than reused.
# v2: trained on the bundled sentences (v1 had random weights).
TINY_VERSION = 2
TINY_TRAIN_STEPS = 400
TINY_BATCH = 32
TINY_LR = 8e-3
DEMO_SITE = "L2R"


def cache_root() -> Path:
    """``$LLAMA3_SAE_CACHE``, else ``$XDG_CACHE_HOME/llama3-sae``, else ``~/.cache/llama3-sae``."""
    if os.environ.get("LLAMA3_SAE_CACHE"):
        return Path(os.environ["LLAMA3_SAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama3-sae"


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
    return (cache_dir or cache_root()) / f"tiny-llama3-v{TINY_VERSION}"


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
    from llama3.checkpoint import save_meta_checkpoint
    from llama3.tokenizer import Tokenizer, default_tokenizer_path

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


def main_tiny_model(argv: list[str] | None = None, prog: str = "llama3-sae tiny-model") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Write (or find) the built-in tiny Llama 3 checkpoint "
                                     "in Meta layout and print its directory.")
    add_dataclass_args(parser, TinyModelConfig)
    cfg = from_namespace(TinyModelConfig, parser.parse_args(argv))
    print(ensure_tiny_checkpoint(cfg.cache_dir, force=cfg.force))
    return 0


# --------------------------------------------------------------------------- the demo
@dataclass
class DemoConfig:
    prompts: list[str] = field(default_factory=lambda: ["The delegates gathered at the",
                                                        "Senior diplomats met to discuss"])
    """Prompts to complete, without and with steering."""
    concept: str | None = None
    """Steer toward this word: the clearest latent whose label mentions it or, when no label does, the latent
    with the highest attribution to the word as the first prompt's next token. Default: the clearest
    latent whose label is a word (a token detector, on this small model)."""
    latent: int | None = None
    """Steer this latent instead of choosing one."""
    steer_value: float | None = None
    """Value added to the latent; default: 3x the largest activation it reached in its top examples."""
    max_new_tokens: int = 24
    """Tokens generated per prompt."""
    temperature: float = 0.7
    """Sampling temperature (0 = greedy)."""
    top_p: float = 0.9
    """Nucleus sampling threshold."""
    seed: int = 42
    """Random seed (the same for both runs, so the difference is the steering's)."""
    n_latents: int = 256
    """Latents of the demo SAE."""
    k: int = 8
    """Active latents per token of the demo SAE."""
    train_steps: int = 1000
    """SAE training steps (batch 256)."""
    llm_labels: bool = False
    """Label the 20 strongest latents with Claude (needs ANTHROPIC_API_KEY in the environment; a few cents).
    Without it, labels come from a local heuristic (the tokens each latent fires on)."""
    work_dir: Path | None = None
    """Where the demo writes its activations, SAE and examples (default: a folder in the cache). A folder an
    earlier demo made is cleared at the start; any other folder must be new or empty."""
    cache_dir: Path | None = None
    """Where the tiny model is cached (default: $LLAMA3_SAE_CACHE or ~/.cache/llama3-sae)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        problems = []
        if not self.prompts or not all(p.strip() for p in self.prompts):
            problems.append("--prompts needs at least one non-empty prompt")
        for name in ("max_new_tokens", "n_latents", "k", "train_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.k > self.n_latents:
            problems.append(f"--k {self.k} exceeds --n-latents {self.n_latents}")
        if self.concept is not None and not self.concept.strip():
            problems.append("--concept is empty; give a word, or leave it out")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class DemoResult:
    ckpt_dir: Path
    sae_dir: Path
    latent: int
    label: str
    steer_value: float
    how_chosen: str
    unsteered: list[str]
    steered: list[str]
    labels_from: str


WORK_MARKER = ".llama3-sae-demo"


def prepare_work_dir(work: Path) -> None:
    """An empty ``work``: made, or emptied when an earlier demo made it (the marker says so). Anything else
    is refused: the demo never deletes a folder it did not create."""
    if work.exists():
        if not work.is_dir():
            raise ValueError(f"--work-dir {work} is a file; pass a folder")
        if any(work.iterdir()):
            if not (work / WORK_MARKER).is_file():
                raise ValueError(f"--work-dir {work} is not empty and was not made by the demo; pass a new or empty "
                                 "folder (the demo clears its folder on every run)")
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("made by llama3-sae demo; cleared on its next run\n")


def run_demo(cfg: DemoConfig, console=None) -> DemoResult:
    """Every stage, in order; prints progress to ``console`` (stderr) and returns what it made."""
    from rich.console import Console
    from rich.markup import escape

    from capture.capture import format_summary as capture_summary
    from capture.capture import run_capture
    from capture.config import CaptureConfig, PreprocessConfig
    from capture.preprocess import format_summary as preprocess_summary
    from capture.preprocess import run_preprocess
    from interpret import heuristic_labels
    from interpret.examples import TopExamplesConfig, run_top_examples
    from training import TrainConfig, run_train

    # soft_wrap: paths and the commands printed at the end stay on one line, ready to copy.
    console = console or Console(stderr=True, soft_wrap=True)
    sentences = bundled_sentences()

    def stage(n: int, text: str) -> None:
        console.rule(f"[bold]{n}/7 {text}", align="left")

    stage(1, "tiny model")
    ckpt = ensure_tiny_checkpoint(cfg.cache_dir)
    console.print(f"{escape(str(ckpt))}  (Llama 3 architecture, dim 64, 4 layers, the real tokenizer; trained "
                  f"briefly on {sentences.name})")
    work = cfg.work_dir or (cfg.cache_dir or cache_root()) / f"demo-v{TINY_VERSION}"
    prepare_work_dir(work)
    acts, sae_dir = work / "activations", work / "sae"

    stage(2, f"capture activations at {DEMO_SITE} over the bundled sentences")
    summary = run_capture(CaptureConfig(ckpt_dir=ckpt, data=(sentences,), sites=DEMO_SITE, out=acts, dtype="fp32",
                                        model_dtype="fp32", device="cpu", progress=cfg.progress), console=console)
    console.print(escape(capture_summary(summary)))

    stage(3, "preprocess: statistics and a shuffled copy")
    store = acts / DEMO_SITE
    pre = run_preprocess(PreprocessConfig(store=store, workers=1, progress=cfg.progress), console=console)
    console.print(escape(preprocess_summary(pre)))

    stage(4, f"train a TopK SAE ({cfg.n_latents} latents, k={cfg.k})")
    train_cfg = TrainConfig(store=store / "shuffled", out=sae_dir, n_latents=cfg.n_latents, k=cfg.k,
                            batch_size=256, steps=cfg.train_steps, lr=2e-3, warmup_steps=50, k_aux=32,
                            dead_after_tokens=50_000, device="cpu", checkpoint_every=cfg.train_steps,
                            log_every=max(1, cfg.train_steps // 5), val_every=0, plots=False,
                            progress=cfg.progress, prefetch=0)
    run_train(train_cfg, console=console)

    stage(5, "top-activating examples of every latent")
    run_top_examples(TopExamplesConfig(ckpt_dir=ckpt, sae=sae_dir, data=(sentences,), device="cpu",
                                       model_dtype="fp32", top_n=10, progress=cfg.progress), console=console)

    stage(6, "labels")
    counts = heuristic_labels(sae_dir)
    labels_from = "local heuristic (top tokens; no LLM)"
    console.print(f"{counts['labelled']} latents labelled by the local heuristic: each label lists the tokens that "
                  f"carry most of the latent's activation ({counts['dead']} never fired).")
    if cfg.llm_labels:
        labels_from = _llm_labels(sae_dir, console)
    elif os.environ.get("ANTHROPIC_API_KEY"):
        console.print("ANTHROPIC_API_KEY is set: pass --llm-labels to label with Claude instead (a few cents).")
    else:
        console.print("No ANTHROPIC_API_KEY: these are heuristic labels, not LLM ones.")

    stage(7, "complete without and with steering")
    return _steer_and_compare(cfg, ckpt, sae_dir, labels_from, console)


def _llm_labels(sae_dir: Path, console) -> str:
    from interpret.config import InterpretConfig
    from interpret.labels import run_interpret

    if not os.environ.get("ANTHROPIC_API_KEY"):
        raise SystemExit("--llm-labels needs ANTHROPIC_API_KEY in the environment (it is never read from a file "
                         "or the command line); drop --llm-labels for the local heuristic")
    from apps.latents import read_max_activations

    # The 20 latents that fired hardest: a handful of requests, not hundreds.
    top = sorted(read_max_activations(sae_dir).items(), key=lambda kv: -kv[1])[:20]
    spec = ",".join(str(latent) for latent, _ in top)
    # --llm-labels is the user's go-ahead: the cost estimate is still printed, but not asked about.
    run_interpret(InterpretConfig(sae=sae_dir, latents=spec, sync=True, yes=True), console=console)
    return "Claude for the 20 strongest latents, the local heuristic for the rest"


def choose_latent(engine, concept: str | None, prompt: str) -> tuple[int, str]:
    """The latent to steer (see DemoConfig.concept) and a note on how it was chosen."""
    from .attribution import attribute

    catalog = engine.catalog
    if concept is None:
        # A clear-cut detector of a word (label certainty = share of its activation on the listed tokens);
        # ties broken by the strongest activation seen.
        def wordy(label: str) -> bool:
            first = label.removeprefix("fires on ").split(",")[0].strip(" '")
            return first.isalpha() and len(first) >= 4
        cands = [catalog.info(i) for i in catalog.labels]
        cands = [c for c in cands if c.max_act and wordy(c.label)] or [c for c in cands if c.max_act]
        if not cands:
            raise ValueError("no latent of the demo SAE fired on the bundled sentences; rerun with more --train-steps")
        best = max(cands, key=lambda c: (round(c.certainty or 0.0, 2), c.max_act or 0.0))
        return best.latent, "the clearest word-detecting latent"
    hits = [h for h in catalog.search(concept, limit=50) if h.max_act]
    if hits:
        best = max(hits, key=lambda h: (h.certainty or 0.0, h.max_act or 0.0))
        return best.latent, f"its label mentions {concept!r}"
    tok = engine.llm.tokenizer
    ids = tok.encode(prompt, bos=True, eos=False)
    target = tok.encode(" " + concept.strip(), bos=False, eos=False)[:1]
    result = attribute(engine, ids + target)
    latent = result.top(1)[0][0]
    return latent, (f"no label mentions {concept!r}; highest attribution to {tok.decode(target)!r} after the first "
                    "prompt")


def _steer_and_compare(cfg: DemoConfig, ckpt: Path, sae_dir: Path, labels_from: str, console) -> DemoResult:
    from rich.markup import escape

    from sae import Edit

    from .engine import Engine, ModelOptions, Sampling
    from .terminal import StreamView, describe_edit, make_console

    engine = Engine.load(ModelOptions(ckpt_dir=ckpt, max_seq_len=256, device="cpu", dtype="fp32"), sae_dir,
                         max_batch_size=len(cfg.prompts))
    if cfg.latent is not None:
        latent, how = engine.catalog.check(cfg.latent, what="--latent"), "chosen with --latent"
    else:
        latent, how = choose_latent(engine, cfg.concept, cfg.prompts[0])
    info = engine.catalog.info(latent)
    value = cfg.steer_value if cfg.steer_value is not None else round(3 * (info.max_act or 2.5), 2)
    edit = Edit(latent, "add", value)
    console.print(escape(f"steering latent {latent} ({how}): label {info.label!r} ({labels_from}); largest "
                         f"activation in its top examples {info.max_act or 0:.2f}; adding {value:g}"))
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed, cfg.max_new_tokens)
    tokens = engine.encode_prompts(cfg.prompts)
    out = make_console()
    runs = {}
    for name, edits in (("unsteered", []), (f"steered: {describe_edit(edit, engine.catalog)}", [edit])):
        if not out.is_terminal:
            print(f"== {name}", flush=True)
        view = StreamView(out, cfg.prompts, catalog=engine.catalog, edits=edits, show_latents=True, title=name)
        runs[name] = view.run(engine.stream(tokens, sampling, edits, top_latents=5))
    unsteered, steered = runs.values()
    console.print(escape(f"\nDone. Try it yourself:\n  llama3-sae complete --ckpt-dir {ckpt} --sae {sae_dir} "
                         f"{json.dumps(cfg.prompts[0])} --steer {latent}={value:g}\n"
                         f"  llama3-sae ui --ckpt-dir {ckpt} --sae {sae_dir}"))
    return DemoResult(ckpt, sae_dir, latent, info.label, value, how, list(unsteered), list(steered), labels_from)


def main_demo(argv: list[str] | None = None, prog: str = "llama3-sae demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, DemoConfig)
    try:
        cfg = from_namespace(DemoConfig, parser.parse_args(argv))
    except ValueError as e:
        parser.error(str(e))
    run_demo(cfg)
    return 0
