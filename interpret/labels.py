"""Labels for latents: from Claude (Message Batches or synchronous calls) or a local heuristic.

``run_interpret(cfg)`` reads the top examples beside the SAE, builds one request per live latent
(``custom_id`` = the latent index), shows the token count and cost estimate, asks before sending, runs
the job through ``JobRunner`` (resumable; see ``batch_client``), and merges every parsed label into
``SAE_DIR/latents.jsonl``. Replies that cannot be parsed stay in ``SAE_DIR/interpret/labels.results.jsonl``
with their raw text and reason, and are listed in the summary.

``heuristic_labels(sae_dir)`` is the no-API fallback (used by the demo): each latent gets the tokens that
carry most of its activation in its top examples, with ``source`` saying it is a heuristic.
"""

from __future__ import annotations

import math

from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console

from sae.io import is_native_dir

from .requests import Outcome, Request
from .config import InterpretConfig
from .jobs import LLMJob
from .parsing import ParseError, parse_label
from .prompts import LABEL_SYSTEM, PromptOptions, label_prompt, message_params
from .records import LatentExamples, iter_examples, parse_latent_spec, read_examples_meta, read_latents, write_latents

HEURISTIC_SOURCE = "heuristic:top-tokens (no LLM; most activation-weighted firing tokens of the top examples)"


# ---------------------------------------------------------------------- requests and replies
def label_requests(records: Iterable[LatentExamples], cfg: InterpretConfig) -> tuple[list[Request], list[int]]:
    """One request per latent with examples, and the latents left out because they never fired."""
    opts = PromptOptions(top=cfg.prompt_top, per_quantile=cfg.prompt_per_quantile)
    requests, dead = [], []
    for rec in records:
        if rec.is_dead or not rec.docs:
            dead.append(rec.latent)
            continue
        user, shown = label_prompt(rec, opts)
        params = message_params(cfg.model, cfg.max_output_tokens, LABEL_SYSTEM, user, cfg.thinking)
        requests.append(Request(str(rec.latent), params, {"latent": rec.latent, "model": cfg.model, "docs": shown}))
    return requests, dead


def handle_label_reply(outcome: Outcome, meta: dict[str, Any]) -> dict[str, Any]:
    """A succeeded reply -> the fields of its results line (``status`` ok or parse_error)."""
    latent = int(outcome.custom_id)
    try:
        ans = parse_label(outcome.text)
    except ParseError as e:
        why = str(e)
        if outcome.stop_reason == "max_tokens":
            why += " (the reply hit --max-tokens; raise it)"
        return {"latent": latent, "status": "parse_error", "error": why, "raw": outcome.text}
    rec: dict[str, Any] = {"latent": latent, "status": "ok", "label": ans.label, "certainty": ans.certainty,
                           "reasoning": ans.reasoning, "source": str(meta.get("model", ""))}
    if ans.certainty_raw is not None:
        rec["certainty_raw"] = ans.certainty_raw
    if ans.warning:
        rec["warning"] = ans.warning
    return rec


# ---------------------------------------------------------------------- latents.jsonl
def merge_labels(sae_dir: Path, results: Iterable[dict[str, Any]], source: str) -> int:
    """Put each ``ok`` result's label into latents.jsonl (the latest result per latent wins). Scores that
    belonged to a different label are dropped, since they measured that label. Returns how many changed."""
    latest: dict[int, dict[str, Any]] = {}
    for r in results:
        if r.get("status") == "ok" and "label" in r:
            latest[int(r["latent"])] = r
    if not latest:
        return 0
    current = read_latents(sae_dir)
    changed = 0
    for latent, r in latest.items():
        old = current.get(latent, {})
        new = dict(old)
        new.update(latent=latent, label=r["label"], certainty=r.get("certainty"),
                   source=r.get("source") or source)
        if r.get("reasoning"):
            new["reasoning"] = r["reasoning"]
        else:
            new.pop("reasoning", None)
        if old.get("label") != r["label"]:
            new["scores"] = {}
        new.setdefault("scores", {})
        if new != old:
            current[latent] = new
            changed += 1
    if changed:
        write_latents(sae_dir, current)
    return changed


def heuristic_label(rec: LatentExamples, n_tokens: int = 3, background: dict[str, float] | None = None
                    ) -> dict[str, Any] | None:
    """The tokens carrying the most activation over the latent's top examples, or None for a dead latent.

    With ``background`` (token -> its share of all tokens in every latent's examples) a token is ranked by
    share x log(lift)^2, where share is its part of the latent's activation and lift = share / background:
    a latent that fires on whole sentences of a topic is then named by the topic's words, not by "the" and
    ",", while a single-token detector keeps its token. Certainty = the share of the activation on the
    listed tokens (concentrated latents score high)."""
    mass: Counter[str] = Counter()
    docs = {d for agg in rec.top.values() for d, _ in agg} & set(rec.docs)
    for d in docs:
        ex = rec.docs[d]
        for pos, v in ex.acts:
            piece = ex.tokens[pos]
            # Whitespace tokens keep a visible spelling (repr) instead of becoming ''.
            mass[piece.strip() or repr(piece)] += v
    total = sum(mass.values())
    if total <= 0:
        return None
    if background is not None:
        def score(t: str) -> float:
            share = mass[t] / total
            lift = share / max(background.get(t, 0.0), 1e-12)
            return share * math.log(lift) ** 2 if lift > 1 else 0.0

        ranked = sorted(mass, key=lambda t: (-score(t), -mass[t], t))[:n_tokens]
        top = [(t, mass[t]) for t in ranked]
    else:
        top = mass.most_common(n_tokens)
    label = "fires on " + ", ".join(f"'{t}'" for t, _ in top)
    return {"latent": rec.latent, "status": "ok", "label": label,
            "certainty": round(sum(v for _, v in top) / total, 4), "source": HEURISTIC_SOURCE}


def token_shares(sae_dir: Path) -> dict[str, float]:
    """Each token's (as labels spell it) share of all tokens in the distinct documents of the examples file
    (every latent's examples: a sample of the corpus covering what the latents saw)."""
    seen: set[int] = set()
    counts: Counter[str] = Counter()
    for rec in iter_examples(sae_dir):
        for d, ex in rec.docs.items():
            if d not in seen:
                seen.add(d)
                counts.update(piece.strip() or repr(piece) for piece in ex.tokens)
    total = max(sum(counts.values()), 1)
    return {t: c / total for t, c in counts.items()}


def heuristic_labels(sae_dir: str | Path, latents: Iterable[int] | None = None, *,
                     overwrite_llm_labels: bool = False) -> dict[str, int]:
    """Label ``latents`` (all when None) of the SAE in ``sae_dir`` with ``heuristic_label`` and merge them into
    its latents.jsonl. Labels from an LLM are kept unless ``overwrite_llm_labels``. Returns counts:
    ``labelled``, ``dead`` (never fired), ``kept_llm`` (left alone)."""
    sae_dir = Path(sae_dir)
    existing = read_latents(sae_dir)
    background = token_shares(sae_dir)
    out, dead, kept = [], 0, 0
    for rec in iter_examples(sae_dir, latents):
        old = existing.get(rec.latent)
        if (old and not overwrite_llm_labels and old.get("label")
                and not str(old.get("source", "")).startswith("heuristic")):
            kept += 1
            continue
        lab = heuristic_label(rec, background=background)
        if lab is None:
            dead += 1
        else:
            out.append(lab)
    merge_labels(sae_dir, out, HEURISTIC_SOURCE)
    return {"labelled": len(out), "dead": dead, "kept_llm": kept}


# ---------------------------------------------------------------------- confirmation
# ---------------------------------------------------------------------- the command
def run_interpret(cfg: InterpretConfig, *, console: Console | None = None, client: Any = None) -> int:
    """Label the selected latents; returns the process exit code (0 when every request ended ok)."""
    console = console or Console(stderr=True)
    meta = read_examples_meta(cfg.sae)
    latents = parse_latent_spec(cfg.latents, meta.get("n_latents"))
    if (Path(cfg.sae) / "config.json").is_file():
        is_native_dir(Path(cfg.sae))  # a damaged SAE config is an error here too, not only when loading the SAE
    if cfg.heuristic:
        counts = heuristic_labels(cfg.sae, latents, overwrite_llm_labels=cfg.overwrite_llm_labels)
        console.print(f"heuristic labels: {counts['labelled']:,} written to {cfg.sae / 'latents.jsonl'}; "
                      f"{counts['dead']:,} latents never fired; {counts['kept_llm']:,} LLM labels kept")
        return 0
    requests, dead = label_requests(iter_examples(cfg.sae, latents), cfg)
    if dead:
        console.print(f"{len(dead):,} latents never fired on the examples' text and are not sent "
                      f"(first: {dead[:10]})")
    if not requests:
        console.print("no latents to label")
        return 0
    job = LLMJob(cfg, "labels", "labels", len(requests), console, client)
    summary = job.run(requests, handle_label_reply)
    # Merge whatever is parsed, also after an abort: earlier runs' labels may be waiting in the log.
    changed = merge_labels(cfg.sae, job.ok_records(), cfg.model)
    if summary.aborted:
        return 1
    failures = job.finish(summary, requests)
    console.print(f"{changed:,} labels written to {cfg.sae / 'latents.jsonl'}")
    return 0 if not failures else 3

