"""The web app's logic, without Gradio: its options, what one browser session owns, and the handlers
the page calls, written against plain values so that they can be tested without a browser. The page
itself (panels and their wiring) is ``apps.web``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import html
import io
import queue
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from rich.console import Console

from sae import Edit
from sae.conditions import Condition

from .attribution import attribute
from .contrast import run_contrast
from .geometry import GeometryConfig, run_geometry
from .engine import Engine, ModelOptions, Sampling, check_sampling
from .latent_page import build_page, page_html, tokens_html
from .latents import UNLABELLED

T = TypeVar("T")


def in_worker(make: Callable[[], Iterator[T]]) -> Iterator[T]:
    """Iterate ``make()`` on a thread of its own and hand its items over.

    An engine stream holds the model's lock until it ends. Run by the web server directly, a stream whose
    browser went away could stay suspended, lock held, for as long as the server keeps the abandoned
    generator: every other user would wait. On its own thread it always runs to its end (at most
    max_new_tokens steps) or stops at the next step once this side is closed, and releases the lock itself.
    """
    items: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        steps = make()
        try:
            for item in steps:
                items.put(("item", item))
                if stop.is_set():
                    break
        except BaseException as e:  # handed to the consumer, which raises it where it can be reported
            items.put(("error", e))
        else:
            items.put(("done", None))
        finally:
            steps.close()  # type: ignore[attr-defined]

    threading.Thread(target=work, name="llama3-sae-generate", daemon=True).start()
    try:
        while True:
            kind, value = items.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()


# --------------------------------------------------------------------------- options
@dataclass
class UiConfig(ModelOptions):
    sae: Path | None = None
    """SAE directory (this project's format, or any layout load_sae reads). Without it the app only completes."""
    site: str | None = None
    """Hook site of the SAE (e.g. L15R) when its files do not say."""
    host: str = "127.0.0.1"
    """Address to listen on. The default is reachable from this machine only; 0.0.0.0 opens the app (and the
    model) to every machine that can reach this one, without a password."""
    port: int | None = None
    """Port to listen on (default: the first free one from 7860)."""
    share: bool = False
    """Also publish the app through a temporary public gradio.live link."""
    max_batch: int = 4
    """Most prompts per request (one per line); more are refused with a message. Each prompt runs unsteered
    and steered in one batch, so the model is loaded for twice this many rows."""
    concurrency: int = 1
    """Model requests (generations, attributions) running at once; others wait in the queue. They share one
    model, so more than 1 only overlaps their non-model work."""
    queue_size: int = 64
    """Requests that may wait in the queue; more are turned away with a message."""
    steer_slots: int = 8
    """Most latents steered at once per session (one slider each)."""
    max_new_tokens: int = Sampling.max_new_tokens
    """Initial value of the max-new-tokens slider."""
    max_new_tokens_limit: int = 512
    """Upper end of the max-new-tokens slider."""
    temperature: float = Sampling.temperature
    """Initial temperature (0 = greedy)."""
    top_p: float = Sampling.top_p
    """Initial top-p."""
    seed: int | None = 42
    """Initial seed, so that the page's first results reproduce (Gradio shows an unset number as 0, which
    would silently fix the seed at 0). Emptied in the page: a new random seed for every generation, shared by
    its unsteered and steered rows (so that the two differ by the steering only)."""
    range_factor: float = 4.0
    """A slider spans +-this many times the latent's largest activation in its top examples (typing a value
    beyond that in the slider's box widens it)."""
    default_range: float = 10.0
    """Slider range (+-) for latents without top examples to take it from."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch", "concurrency", "queue_size", "steer_slots", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            problems.append(f"max_new_tokens must be in 1..max_new_tokens_limit={self.max_new_tokens_limit}, "
                            f"got {self.max_new_tokens}")
        if not self.default_range > 0 or not self.range_factor > 0:
            problems.append(f"default_range and range_factor must be > 0, got {self.default_range} and "
                            f"{self.range_factor}")
        try:
            check_sampling(self.temperature, self.top_p, self.max_new_tokens)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- per-session state
@dataclass
class Run:
    """The last generation of a session: what the token view and attribution explain."""

    prompts: list[str]
    prompt_lens: list[int]
    unsteered: list[list[int]]
    """Per prompt: prompt + generated ids without steering."""
    steered: list[list[int]] | None
    """The same with the session's edits (None when nothing was steered)."""
    edits: list[Edit]

    @property
    def shown(self) -> list[list[int]]:
        return self.steered if self.steered is not None else self.unsteered


@dataclass
class SessionState:
    """Everything one browser session owns. Gradio keeps one copy per session."""

    steer: dict[int, float] = field(default_factory=dict)
    """latent -> value added to it, in slider order. What is applied; the page always shows these values."""
    ranges: dict[int, float] = field(default_factory=dict)
    """latent -> its slider's bound (+-): the default, widened when a larger value is typed."""
    run: Run | None = None
    highlight: int | None = None
    """The latent whose activations shade the token view."""
    table_latents: list[int] = field(default_factory=list)
    """Latent of each row of the top-latents table."""
    attr_latents: list[int] = field(default_factory=list)
    """Latent of each attribution row (for its open and steer buttons)."""
    chat: list[dict[str, str]] = field(default_factory=list)
    contrast_latents: list[int] = field(default_factory=list)
    """Latent of each row of the contrast table."""
    when: Condition | None = None
    """Steer only at the tokens where this holds (None: everywhere)."""

    def edits(self) -> list[Edit]:
        return [Edit(latent, "add", value, when=self.when) for latent, value in self.steer.items() if value != 0]


def md_escape(text: str) -> str:
    """Labels and tokens are data: shown in Markdown, their * _ ` [ and friends must stay literal."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", text)


def parse_prompts(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def format_outputs(prompts: list[str], texts: list[str]) -> str:
    if len(prompts) == 1:
        return prompts[0] + texts[0]
    return "\n\n".join(f"[{i + 1}] {p}{t}" for i, (p, t) in enumerate(zip(prompts, texts)))


def sampling_of(max_new: Any, temperature: Any, top_p: Any, seed: Any) -> Sampling:
    """The page's sampling controls -> Sampling (ValueError with the problem, for the status line)."""
    try:
        seed_value = None if seed in (None, "") else int(seed)
        return Sampling(temperature=float(temperature), top_p=float(top_p), seed=seed_value,
                        max_new_tokens=int(max_new))
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampling settings: {e}") from None


def changed_tokens(base: Sequence[int], other: Sequence[int]) -> list[bool]:
    """Per token of ``other``: True where it is not in the longest matching alignment with ``base``."""
    marks = [True] * len(other)
    for block in difflib.SequenceMatcher(a=list(base), b=list(other), autojunk=False).get_matching_blocks():
        for j in range(block.b, block.b + block.size):
            marks[j] = False
    return marks


# --------------------------------------------------------------------------- the handlers
class WebApp:
    """The handlers behind the page (see the module docstring)."""

    def __init__(self, engine: Engine, cfg: UiConfig):
        self.engine = engine
        self.cfg = cfg
        self.catalog = engine.catalog

    # ------------------------------------------------------------------ steering
    def slider_bound(self, state: SessionState, latent: int) -> float:
        """The session's slider range for ``latent`` is -bound..bound."""
        if latent not in state.ranges:
            state.ranges[latent] = self.catalog.slider_range(latent, self.cfg.default_range, self.cfg.range_factor)[1]
        return state.ranges[latent]

    def default_value(self, latent: int) -> float:
        """A new slider starts at the latent's strongest activation seen in its top examples (a clear
        push); without top examples, at a quarter of the default range."""
        top = self.catalog.max_acts.get(latent)
        return round(top, 3) if top else self.cfg.default_range / 4

    def add_latent(self, state: SessionState, latent: int, value: float | None = None) -> str:
        """Add a latent to the session's steering; returns a status line."""
        if self.engine.sae is None:
            raise ValueError("no SAE loaded: start the app with --sae SAE_DIR to steer")
        latent = self.catalog.check(int(latent))
        if latent in state.steer:
            return f"latent {latent} is already steered"
        if len(state.steer) >= self.cfg.steer_slots:
            raise ValueError(f"at most {self.cfg.steer_slots} latents at once: remove one first")
        self.slider_bound(state, latent)
        self.set_value(state, latent, self.default_value(latent) if value is None else float(value))
        state.highlight = latent  # the token view shades by the latent just added
        return f"steering latent {latent} ({md_escape(self.catalog.label(latent))}) by {state.steer[latent]:+g}"

    def set_value(self, state: SessionState, latent: int, value: Any) -> float:
        """Apply ``value`` to a steered latent, widening its slider when the value lies outside it. A value
        that is not a finite number within the edit limit is refused (ValueError) and nothing changes."""
        try:
            value = float(value)
            Edit(latent, "add", value)  # the same checks as the generation will make
        except (TypeError, ValueError) as e:
            raise ValueError(f"latent {latent}: {e}") from None
        if abs(value) > self.slider_bound(state, latent):
            state.ranges[latent] = abs(value)  # the slider widens to hold it: what is shown is what is applied
        state.steer[latent] = value
        return value

    def slot_latent(self, state: SessionState, slot: int) -> int | None:
        latents = list(state.steer)
        return latents[slot] if 0 <= slot < len(latents) else None

    def remove_slot(self, state: SessionState, slot: int) -> None:
        latent = self.slot_latent(state, slot)
        if latent is not None:
            del state.steer[latent]

    def set_condition(self, state: SessionState, text: str | None) -> str:
        """Steer only where ``text`` (e.g. ``12>0.75 & 5<1``) holds; empty: everywhere. A condition that does
        not parse or names a latent the SAE lacks is refused (ValueError) and the old one stays."""
        text = (text or "").strip()
        if not text:
            state.when = None
            return "steering applies at every token"
        condition = Condition.parse(text)
        for latent in condition.latents:
            self.catalog.check(latent, what="the condition's latent")
        state.when = condition
        return f"steering applies only where {condition}"

    def search(self, query: str) -> list[tuple[str, str]]:
        hits = self.catalog.search(query or "", limit=30) if self.engine.sae is not None else []
        return [(f"{h.latent} · {h.label}", str(h.latent)) for h in hits]

    def steering_summary(self, state: SessionState) -> str:
        if not state.steer:
            return "No latents steered: search for one above (or click a row of the latents table)."
        where = f" (only where {state.when})" if state.when is not None else ""
        return "Applied: " + "; ".join(f"latent {k} {v:+g}" for k, v in state.steer.items()) + where

    # ------------------------------------------------------------------ generation
    def generate(self, state: SessionState, prompts_text: str, sampling: Sampling) -> Iterator[dict[str, Any]]:
        """Yield dicts of what changed: unsteered, steered (texts), latents (table rows), tokens
        (attribution choices), view (token view HTML), status. Unsteered and steered rows run in one batch.
        Bad input ends in one status, never an exception."""
        prompts = parse_prompts(prompts_text)
        if not prompts:
            yield {"status": "Type a prompt first (one per line)."}
            return
        if len(prompts) > self.cfg.max_batch:
            yield {"status": f"{len(prompts)} prompts: this server completes at most {self.cfg.max_batch} at once. "
                             "Remove some lines."}
            return
        try:
            tokens = self.engine.encode_prompts(prompts)
        except ValueError as e:
            yield {"status": f"Cannot complete: {e}."}
            return
        n, edits = len(prompts), state.edits()
        rows, row_edits = list(tokens), []
        if edits:  # rows n..2n-1 are the same prompts with the edits; seeds per prompt, so only steering differs
            rows += tokens
            row_edits = [dataclasses.replace(e, rows=tuple(range(n, 2 * n))) for e in edits]
        # One seed per prompt, shared by its unsteered and steered row: a fresh one when the page gives none.
        seed = sampling.seed if sampling.seed is not None else secrets.randbelow(2**31)
        seeds = [seed + i for i in range(n)] * (2 if edits else 1)
        texts = [""] * len(rows)
        top = 10 if self.engine.sae is not None else 0
        last = None
        for last in in_worker(lambda: self.engine.stream(rows, sampling, row_edits, top_latents=top, seeds=seeds)):
            for i, d in enumerate(last.deltas):
                texts[i] += d
            part = {"unsteered": format_outputs(prompts, texts[:n]), "status": "generating…"}
            if edits:
                part["steered"] = format_outputs(prompts, texts[n:])
            yield part
        assert last is not None and last.completions is not None
        done = [list(c.prompt_tokens) + list(c.tokens) for c in last.completions]
        state.run = Run(prompts, [len(t) for t in tokens], done[:n], done[n:] if edits else None, list(edits))
        out: dict[str, Any] = {"tokens": self.token_choices(state)}
        if edits:
            same = done[:n] == done[n:]
            out["status"] = "Done." + (" The steered output equals the unsteered one: try a larger value." if same
                                       else "")
        else:
            out["status"] = "Done. No latents steered, so only the unsteered output was generated."
            out["steered"] = "(add a latent on the right to steer)"
        if last.output_latents is not None:
            shown = last.output_latents[n:] if edits else last.output_latents[:n]
            out["latents"] = self.latent_rows(state, shown)
            if state.highlight is None and state.table_latents:
                state.highlight = state.table_latents[0]
        out["view"] = self.token_view(state)
        out["highlight_choices"] = self.highlight_choices(state)
        yield out

    def token_choices(self, state: SessionState) -> list[tuple[str, str]]:
        """The first prompt's generated tokens of the shown (steered, else unsteered) output, for attribution."""
        if state.run is None:
            return []
        tok, seq, start = self.engine.llm.tokenizer, state.run.shown[0], state.run.prompt_lens[0]
        return [(f"{p - start + 1}: {tok.decode([seq[p]])!r}", str(p)) for p in range(start, len(seq))]

    def latent_rows(self, state: SessionState, per_row: list[list[tuple[int, float]]]) -> list[list[Any]]:
        rows, latents = [], []
        for i, hits in enumerate(per_row):
            for latent, value in hits:
                mark = "  ◆ steered" if latent in state.steer else ""
                rows.append([i + 1, latent, round(value, 3), self.catalog.label(latent) + mark])
                latents.append(latent)
        state.table_latents = latents
        return rows

    def highlight_choices(self, state: SessionState) -> list[tuple[str, str]]:
        latents = list(dict.fromkeys([*state.steer, *state.table_latents]))
        if state.highlight is not None and state.highlight not in latents:
            latents.insert(0, state.highlight)
        return [(f"{lat} · {self.catalog.label(lat)}", str(lat)) for lat in latents]

    def token_view(self, state: SessionState, latent: int | None = None) -> str:
        """HTML of the last run token by token, shaded by ``latent``'s activation (default: the session's
        highlighted latent); steered tokens that differ from the unsteered text are outlined."""
        run = state.run
        if run is None:
            return ""
        if latent is not None:
            state.highlight = self.catalog.check(int(latent))
        lat = state.highlight
        tok = self.engine.llm.tokenizer
        groups = [("unsteered", run.unsteered, None)]
        if run.steered is not None:
            groups.append(("steered", run.steered, run.edits))
        acts: dict[str, list[list[float]]] = {}
        if lat is not None and self.engine.sae is not None:
            for name, seqs, edits in groups:
                acts[name] = self.engine.latent_acts(seqs, lat, edits or ())
        peak = max([v for per in acts.values() for seq in per for v in seq] + [0.0])
        title = (f"shaded by latent {lat} · {html.escape(self.catalog.label(lat))} (darkest = {peak:.2f})"
                 if lat is not None and self.engine.sae is not None else "no latent selected")
        parts = [f'<div class="token-view"><p>{title}; <span class="diff">outlined</span>: steered tokens not in '
                 "the unsteered text</p>"]
        for i, prompt in enumerate(run.prompts):
            parts.append(f"<p><b>[{i + 1}]</b></p>")
            for name, seqs, _ in groups:
                seq = seqs[i]
                pieces = [tok.decode([t]) for t in seq]
                values = [v for v in acts[name][i]] if name in acts else [0.0] * len(seq)
                marks = ([False] * run.prompt_lens[i] + changed_tokens(run.unsteered[i][run.prompt_lens[i]:],
                                                                        seq[run.prompt_lens[i]:])
                         if name == "steered" else [])
                parts.append(f'<div class="tokens" data-row="{name}-{i}"><span class="act">{name}</span> '
                             f"{tokens_html(pieces, values, peak, marks=marks)}</div>")
        parts.append("</div>")
        return "".join(parts)

    # ------------------------------------------------------------------ chat
    def chat(self, state: SessionState, message: str, sampling: Sampling) -> Iterator[dict[str, Any]]:
        """Yield chat (the steered conversation), unsteered (what the model replies without the edits, from
        the same conversation, in the same batch) and status."""
        message = (message or "").strip()
        if not message:
            yield {"status": "Type a message first."}
            return
        dialog = [*state.chat, {"role": "user", "content": message}]
        try:
            tokens = self.engine.encode_dialog(dialog)
        except ValueError as e:
            yield {"status": f"Cannot reply: {e}."}
            return
        edits = state.edits()
        rows = [tokens, tokens] if edits else [tokens]
        row_edits = [dataclasses.replace(e, rows=(1,)) for e in edits]
        seeds = [sampling.seed if sampling.seed is not None else secrets.randbelow(2**31)] * len(rows)
        replies = [""] * len(rows)
        for step in in_worker(lambda: self.engine.stream(rows, sampling, row_edits, top_latents=0, seeds=seeds)):
            for i, d in enumerate(step.deltas):
                replies[i] += d
            part = {"chat": [*dialog, {"role": "assistant", "content": replies[-1]}], "status": "replying…"}
            if edits:
                part["unsteered"] = replies[0]
            yield part
        state.chat = [*dialog, {"role": "assistant", "content": replies[-1]}]
        yield {"chat": copy.deepcopy(state.chat), "status": "Done.",
               "unsteered": replies[0] if edits else "(nothing steered: the reply above is the unsteered one)"}

    # ------------------------------------------------------------------ contrast
    def contrast(self, state: SessionState, a_text: str, b_text: str, query: str = "", direction: str = "a",
                 top: int = 20) -> tuple[str, list[list[Any]]]:
        """(summary, table rows) of the latents that separate the lines of ``a_text`` from those of ``b_text``
        (empty B: from the corpus baseline)."""
        if self.engine.sae is None:
            raise ValueError("contrast needs an SAE: start the app with --sae SAE_DIR")
        a, b = parse_prompts(a_text), parse_prompts(b_text)
        rows = run_contrast(self.engine, a, b, query=query or None, direction=direction, top=top)
        state.contrast_latents = [r.latent for r in rows]
        if b:
            table = [[r.latent, self.catalog.label(r.latent), round(r.mean_a, 4), round(r.mean_b, 4), round(r.t, 2),
                      float(f"{r.p_adjusted:.2g}")] for r in rows]
            what = f"{len(a)} texts in A vs {len(b)} in B, by Welch's t (p Bonferroni-adjusted)"
        else:
            table = [[r.latent, self.catalog.label(r.latent), round(r.mean, 4), round(r.baseline, 4),
                      round(r.lift, 4), None] for r in rows]
            what = f"{len(a)} text(s) against the corpus baseline, by lift of the mean activation"
        return what + (f", reranked by labels matching {md_escape(query)!s}" if query else "") + \
            ". Click a row for its page.", table

    # ------------------------------------------------------------------ geometry
    def geometry(self, other: str, out_dir: Path) -> tuple[str, str | None]:
        """Match this app's SAE (as B) against the SAE at ``other`` (A): a summary and the map's PNG path."""
        if self.engine.sae is None or self.engine.sae_dir is None:
            raise ValueError("geometry needs the app's SAE: start the app with --sae SAE_DIR")
        text = (other or "").strip()
        path = Path(text)
        if not text or not path.exists():
            raise ValueError(f"{other!r}: give the directory of another SAE of this model's width")
        rep = run_geometry(GeometryConfig(a=path, b=Path(self.engine.sae_dir), out=out_dir, show=0),
                           console=Console(file=io.StringIO()))
        c = rep["counts"]
        splits = "; ".join(f"A {s['a']} -> " + ", ".join(f"{b['latent']} ({b['cosine']:.2f})" for b in s["b"][:4])
                           for s in rep["splits"][:5])
        summary = (f"This SAE's {len(rep['latents']):,} latents against {md_escape(str(path))}: {c['matched']:,} "
                   f"matched, {c['split']:,} in splits, {c['near']:,} near, {c['novel']:,} novel. Largest splits: "
                   f"{splits or 'none'}.")
        return summary, rep.get("map")

    # ------------------------------------------------------------------ latent pages
    def latent_page(self, latent: Any) -> str:
        """The HTML page of a latent (ValueError for an index that is not one)."""
        if self.engine.sae is None:
            raise ValueError("latent pages need an SAE: start the app with --sae SAE_DIR")
        try:
            latent = int(str(latent).strip())
        except ValueError:
            raise ValueError(f"{latent!r} is not a latent index") from None
        self.catalog.check(latent)
        page = build_page(latent, self.catalog, sae=self.engine.sae, model=self.engine.llm.model,
                          tokenizer=self.engine.llm.tokenizer)
        return page_html(page)

    # ------------------------------------------------------------------ attribution
    def attribute(self, state: SessionState, position: str | int | None, k: int, by: str = "contribution"
                  ) -> tuple[str, list[tuple[int, str]]]:
        """Markdown summary and (latent, row text) of the top k latents for the chosen token of the first
        prompt's shown output, ranked by activation x gradient (``by="contribution"``) or the gradient."""
        if self.engine.sae is None:
            raise ValueError("attribution needs an SAE: start the app with --sae SAE_DIR")
        if state.run is None or position in (None, ""):
            raise ValueError("generate first, then pick a token of the output to explain")
        result = attribute(self.engine, state.run.shown[0], int(position),
                           state.run.edits if state.run.steered is not None else ())
        rows = []
        for latent, contrib, grad, act in result.top(k, by=by):
            rows.append((latent, f"**{latent}** · {md_escape(self.catalog.label(latent))} · contribution "
                                 f"{contrib:+.3f} · gradient {grad:+.3f} · max act {act:.2f}"))
        state.attr_latents = [r[0] for r in rows]
        negatives = ", ".join(f"{lat} ({c if by == 'contribution' else g:+.2f})"
                              for lat, c, g, _ in result.top(3, by=by, negative=True))
        what = ("contribution = activation x gradient, summed over positions (what the latent added)"
                if by == "contribution" else
                "gradient with respect to each latent's activation, summed over positions (steering a latent "
                "by +1 changes the metric by about this)")
        summary = (f"Token {md_escape(repr(result.token_text))} at position {result.position}: logit - mean logit = "
                   f"{result.metric:.3f}. Ranked by {what}. Most negative: {negatives}.")
        return summary, rows


def slider_label(catalog: Any, latent: int) -> str:
    label = catalog.label(latent)
    return f"latent {latent} · {label}" if label != UNLABELLED else f"latent {latent}"
