"""``llama3-sae steer-eval``: does steering a latent work, and what does it cost the text?

For one latent and a set of prompts, sampled completions without the edit, with it at each strength (a
multiple of the latent's largest activation in its top examples), and with a prompting baseline ("Talk
about CONCEPT." before each prompt, unsteered), all with the same seeds. Each condition is scored, as the
AxBench and AutoSteer evaluations do, on both axes:

- **concept**: the target latent's mean activation over the generated tokens, read by the unsteered model
  (so steering's own push is not counted), and the share of completions in which it fires;
- **fluency**: the mean log-probability per generated token under the unsteered model (higher is more
  fluent; its drop from the unsteered completions is the cost);
- with ``--judge`` and ``ANTHROPIC_API_KEY``, an LLM judge as well: Claude rates each completion 0 (not about
  the concept), 1 (somewhat) or 2 (clearly), through the resumable batch client (``--judge-sync`` for plain
  calls); the job's state lives in OUT/interpret/.

Writes ``steer_eval.json`` and ``steer_eval.png`` (concept against fluency, one point per condition).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llama3_sae.config import parse_config
from llama3_sae.files import atomic_write_json
from sae import Edit

from interpret.config import DEFAULT_MODEL, LLMJobConfig
from interpret.jobs import LLMJob
from interpret.prompts import message_params
from interpret.requests import Outcome, Request

from .contrast import read_texts
from .demo import NEUTRAL_PROMPTS
from .demo_metrics import mean_logprob
from .engine import Engine, ModelOptions, Sampling, SamplingOptions

RESULTS, PLOT = "steer_eval.json", "steer_eval.png"


@dataclass
class SteerEvalConfig(SamplingOptions, ModelOptions):
    """``llama3-sae steer-eval``: concept and fluency of steering one latent, against prompting."""

    sae: Path | None = None
    """SAE directory (with top_examples.jsonl for the latent's largest activation)."""
    latent: int = 0
    """The latent to steer."""
    strengths: str = "0.5,1,2,4"
    """Comma-separated strengths, as multiples of the latent's largest activation in its top examples."""
    prompts: Path | None = None
    """Prompts, one per line (default: the demo's neutral prompts)."""
    samples: int = 16
    """Completions per condition (cycling through the prompts; row i samples with seed + i)."""
    concept: str | None = None
    """What the prompting baseline asks for ("Talk about CONCEPT."); default: the latent's label."""
    out: Path | None = None
    """Directory for steer_eval.json and steer_eval.png (default: SAE/steer_eval/latent-N)."""
    plots: bool = True
    """Write the concept-vs-fluency plot (needs matplotlib)."""
    judge: bool = False
    """Also have Claude rate each completion for the concept (needs ANTHROPIC_API_KEY; costs a few cents)."""
    judge_model: str = DEFAULT_MODEL
    """Claude model id of the judge."""
    judge_sync: bool = False
    """Send the judge's requests as plain messages.create calls instead of a Message Batch."""
    yes: bool = False
    """Send the judge's requests without asking after the cost estimate."""
    site: str | None = None
    """Hook site of the SAE when its files do not say."""

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = 42  # the same seeds for every condition need a seed
        super().__post_init__()
        if self.sae is None:
            raise ValueError("--sae is required")
        self.sae = Path(self.sae)
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        self.strength_list()  # checked now, before the model loads

    def strength_list(self) -> list[float]:
        try:
            values = [float(s) for s in self.strengths.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--strengths {self.strengths!r}: give numbers separated by commas, e.g. 0.5,1,2") from None
        if not values:
            raise ValueError("--strengths is empty")
        return values


def _concept(engine: Engine, prompts: list[list[int]], outputs: list[list[int]], latent: int) -> tuple[float, float]:
    """(mean activation of ``latent`` over the generated tokens, share of completions where it fired), read by
    the unsteered model."""
    seqs = [p + o for p, o in zip(prompts, outputs) if o]
    if not seqs:
        return float("nan"), float("nan")
    acts = engine.latent_acts(seqs, latent)
    gen = [a[len(p):] for a, p, o in zip(acts, prompts, outputs) if o]
    values = [v for g in gen for v in g]
    return sum(values) / max(len(values), 1), sum(max(g, default=0.0) > 0 for g in gen) / len(gen)


def evaluate(engine: Engine, cfg: SteerEvalConfig, prompts: list[str]) -> dict[str, Any]:
    latent = engine.catalog.check(cfg.latent, what="--latent")
    top = engine.catalog.max_acts.get(latent)
    if not top:
        raise ValueError(f"latent {latent} has no largest activation to scale the strengths by: run "
                         f"`llama3-sae top-examples --sae {cfg.sae}` first (or it never fired)")
    label = engine.catalog.label(latent)
    concept = cfg.concept or label
    rows_prompts = [prompts[i % len(prompts)] for i in range(cfg.samples)]
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed, cfg.max_new_tokens)

    def run(texts: list[str], edits: list[Edit]) -> tuple[list[list[int]], list[list[int]], list[str]]:
        tokens = engine.encode_prompts(texts)
        *_, last = engine.stream(tokens, sampling, edits, top_latents=0)
        return tokens, [list(c.tokens) for c in last.completions], [c.text for c in last.completions]

    conditions = [("unsteered", rows_prompts, [], 0.0),
                  (f"prompting: 'Talk about {concept}.'", [f"Talk about {concept}. {p}" for p in rows_prompts], [],
                   0.0)]
    conditions += [(f"steer x{s:g}", rows_prompts, [Edit(latent, "add", s * top)], s) for s in cfg.strength_list()]
    results = []
    model = engine.llm.model
    for name, texts, edits, strength in conditions:
        tokens, outputs, completions = run(texts, edits)
        mean_act, share = _concept(engine, tokens, outputs, latent)
        with engine.lock:
            fluency = mean_logprob(model, tokens, outputs)
        results.append({"condition": name, "strength": strength, "value": strength * top, "concept_mean_act": mean_act,
                        "concept_share": share, "fluency": fluency, "examples": completions[:3],
                        "completions": completions})
    base = results[0]["fluency"]
    for r in results:
        r["fluency_drop"] = base - r["fluency"]
    return {"latent": latent, "label": label, "max_act": top, "concept": concept, "prompts": rows_prompts,
            "sampling": asdict(sampling), "results": results}


JUDGE_SYSTEM = ("You rate short texts. Reply with one digit: 0 if the text is not about the given concept, 1 if "
                "it touches on it, 2 if it is clearly about it. No other words.")


def handle_judge_reply(outcome: Outcome, meta: dict[str, Any]) -> dict[str, Any]:
    """A judge's reply -> its 0-2 rating (the first such digit), or a parse error."""
    digit = next((ch for ch in outcome.text if ch in "012"), None)
    if digit is None:
        return {"status": "parse_error", "error": "no rating 0, 1 or 2 in the reply", "raw": outcome.text}
    return {"status": "ok", "rating": int(digit), "condition": meta["condition"]}


def judge(report: dict[str, Any], cfg: SteerEvalConfig, out: Path, console: Console, client: Any = None) -> None:
    """Add each condition's mean judge rating (``judge_mean``, 0-2) and how many were rated to ``report``."""
    job_cfg = LLMJobConfig(sae=out, model=cfg.judge_model, sync=cfg.judge_sync, yes=cfg.yes, max_output_tokens=16,
                           sync_limit=10_000, expected_output_tokens=2, progress=False)
    requests = [Request(f"{ci}-{i}", message_params(cfg.judge_model, 16, JUDGE_SYSTEM,
                                                     f"Concept: {report['concept']}\n\nText: {text}", "model-default"),
                        meta={"condition": ci})
                for ci, r in enumerate(report["results"]) for i, text in enumerate(r["completions"])]
    job = LLMJob(job_cfg, "judge", "steering judge", len(requests), console, client)
    summary = job.run(requests, handle_judge_reply)
    ratings: dict[int, list[int]] = {}
    for rec in job.ok_records():
        ratings.setdefault(int(rec["condition"]), []).append(int(rec["rating"]))
    for ci, r in enumerate(report["results"]):
        got = ratings.get(ci, [])
        r["judge_mean"] = sum(got) / len(got) if got else None
        r["judge_rated"] = len(got)
    job.finish(summary, requests)


def plot(report: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency)

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for r in report["results"]:
        ax.scatter(r["fluency"], r["concept_mean_act"], s=40)
        ax.annotate(r["condition"], (r["fluency"], r["concept_mean_act"]), fontsize="small",
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("fluency: mean log-prob per token under the unsteered model (higher is better)")
    ax.set_ylabel(f"concept: latent {report['latent']}'s mean activation on the output (higher is more)")
    ax.set_title(f"steering latent {report['latent']} ({report['label'][:40]})", fontsize="medium")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def main_steer_eval(argv: list[str] | None = None, prog: str = "llama3-sae steer-eval") -> int:
    cfg = parse_config(SteerEvalConfig, argv, prog, __doc__, usage_errors=True,
                       epilog="example:\n  llama3-sae steer-eval --sae SAE_DIR --latent 1021 --strengths 0.5,1,2")
    prompts = read_texts(cfg.prompts) if cfg.prompts is not None else list(NEUTRAL_PROMPTS)
    engine = Engine.load(cfg, cfg.sae, cfg.site, max_batch_size=cfg.samples)
    report = evaluate(engine, cfg, prompts)
    out = cfg.out or Path(cfg.sae) / "steer_eval" / f"latent-{report['latent']}"
    console = Console()
    if cfg.judge:
        judge(report, cfg, out, console)
    table = Table(title=f"steering latent {report['latent']} ({report['label']}), max activation "
                        f"{report['max_act']:.3g}, {cfg.samples} samples each, same seeds", title_justify="left")
    for col in ("condition", "concept (mean act)", "fires in", "fluency", "drop", *(["judge 0-2"] if cfg.judge else [])):
        table.add_column(col, justify="left" if col == "condition" else "right")
    for r in report["results"]:
        judged = [f"{r['judge_mean']:.2f}" if r.get("judge_mean") is not None else "-"] if cfg.judge else []
        table.add_row(r["condition"], f"{r['concept_mean_act']:.3f}", f"{r['concept_share']:.0%}",
                      f"{r['fluency']:.3f}", f"{r['fluency_drop']:+.3f}", *judged)
    console.print(table)
    if cfg.plots:
        try:
            report["plot"] = str(plot(report, out / PLOT))
        except ImportError:
            console.print("note: matplotlib is not installed, so no plot was written")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULTS, report, indent=1)
    console.print(f"results: {out / RESULTS}")
    return 0
