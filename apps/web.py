"""``llama3-sae ui``: the web app (Gradio 6). Steer a model with SAE latents from a browser.

* Text: prompts one per line, streamed, unsteered and steered side by side; the latents most active
  over the steered output, with labels (click a row to steer that latent).
* Chat: a conversation with the same steering.
* Steering: search latents by label, add them as sliders (the range comes from the activations seen in
  the latent's top examples), move a slider, generate again.
* Attribution: pick a generated token; the latents whose activation most raises (logit of that token -
  mean logit), each with a button to steer it (see ``apps.attribution``).

Every browser session has its own steering (a ``gr.State``); nothing is ever set on the shared SAE or
model outside one generation, so two users never see each other's settings. The server listens on
127.0.0.1 unless ``--host`` says otherwise; ``--share`` (a public Gradio link) is off unless asked for.
Model calls go through one queue with ``--concurrency`` of them running at once.
"""

from __future__ import annotations

import copy
import queue
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sae import Edit

from llama3_sae.config import parse_config
from .attribution import attribute
from .engine import Engine, EngineStep, ModelOptions, Sampling, check_sampling
from .latents import UNLABELLED

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MODEL_QUEUE = "model"
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
    """Most prompts per request (one per line); more are refused with a message."""
    concurrency: int = 1
    """Model requests (generations, attributions) running at once; others wait in the queue. They share one
    model, so more than 1 only overlaps their non-model work."""
    queue_size: int = 64
    """Requests that may wait in the queue; more are turned away with a message."""
    steer_slots: int = 8
    """Most latents steered at once per session (one slider each)."""
    max_new_tokens: int = 48
    """Initial value of the max-new-tokens slider."""
    max_new_tokens_limit: int = 512
    """Upper end of the max-new-tokens slider."""
    temperature: float = 0.7
    """Initial temperature (0 = greedy)."""
    top_p: float = 0.9
    """Initial top-p."""
    seed: int | None = 42
    """Initial seed (empty in the page: a new random sample each time)."""
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
        if not self.default_range > 0:
            problems.append(f"default_range must be > 0, got {self.default_range}")
        try:
            check_sampling(self.temperature, self.top_p, self.max_new_tokens)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- per-session state
@dataclass
class SessionState:
    """Everything one browser session owns. Gradio keeps one copy per session."""

    steer: dict[int, float] = field(default_factory=dict)
    """latent -> value added to it, in slider order."""
    unsteered_key: tuple | None = None
    unsteered: EngineStep | None = None
    """The last step of the last unsteered run and the inputs that made it (reused while the inputs and the
    sampling are unchanged and deterministic, so moving a slider only regenerates the steered side)."""
    last_tokens: list[int] = field(default_factory=list)
    """Prompt + generated ids of the first prompt's last shown output (what attribution explains)."""
    last_prompt_len: int = 0
    last_edits: list[Edit] = field(default_factory=list)
    table_latents: list[int] = field(default_factory=list)
    """Latent of each row of the top-latents table."""
    attr_latents: list[int] = field(default_factory=list)
    """Latent of each attribution row (for its steer button)."""
    chat: list[dict[str, str]] = field(default_factory=list)

    def edits(self) -> list[Edit]:
        return [Edit(latent, "add", value) for latent, value in self.steer.items() if value != 0]


def md_escape(text: str) -> str:
    """Labels and tokens are data: shown in Markdown, their * _ ` [ and friends must stay literal."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", text)


def parse_prompts(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def format_outputs(prompts: list[str], texts: list[str]) -> str:
    if len(prompts) == 1:
        return prompts[0] + texts[0]
    return "\n\n".join(f"[{i + 1}] {p}{t}" for i, (p, t) in enumerate(zip(prompts, texts)))


def _texts(step: EngineStep) -> list[str]:
    assert step.completions is not None
    return [c.text for c in step.completions]


def sampling_of(max_new: Any, temperature: Any, top_p: Any, seed: Any) -> Sampling:
    """The page's sampling controls -> Sampling (ValueError with the problem, for the status line)."""
    try:
        seed_value = None if seed in (None, "") else int(seed)
        return Sampling(temperature=float(temperature), top_p=float(top_p), seed=seed_value,
                        max_new_tokens=int(max_new))
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampling settings: {e}") from None


# --------------------------------------------------------------------------- the app logic (no Gradio)
class WebApp:
    """The handlers behind the page, written against plain values so they can be tested without a browser."""

    def __init__(self, engine: Engine, cfg: UiConfig):
        self.engine = engine
        self.cfg = cfg
        self.catalog = engine.catalog

    # ------------------------------------------------------------------ steering
    def slider_range(self, latent: int) -> tuple[float, float]:
        return self.catalog.slider_range(latent, self.cfg.default_range)

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
        state.steer[latent] = self.default_value(latent) if value is None else float(value)
        return f"steering latent {latent} ({md_escape(self.catalog.label(latent))}) by {state.steer[latent]:+g}"

    def set_slot(self, state: SessionState, slot: int, value: float) -> None:
        latents = list(state.steer)
        if slot < len(latents) and value is not None:
            state.steer[latents[slot]] = float(value)

    def remove_slot(self, state: SessionState, slot: int) -> None:
        latents = list(state.steer)
        if slot < len(latents):
            del state.steer[latents[slot]]

    def search(self, query: str) -> list[tuple[str, str]]:
        hits = self.catalog.search(query or "", limit=30) if self.engine.sae is not None else []
        return [(f"{h.latent} · {h.label}", str(h.latent)) for h in hits]

    def steering_summary(self, state: SessionState) -> str:
        if not state.steer:
            return "No latents steered: search for one above (or click a row of the latents table)."
        return "Steering: " + "; ".join(f"latent {k} {v:+g}" for k, v in state.steer.items())

    # ------------------------------------------------------------------ generation
    def generate(self, state: SessionState, prompts_text: str, sampling: Sampling) -> Iterator[dict[str, Any]]:
        """Yield dicts of what changed: unsteered, steered (texts), latents (table rows), tokens
        (attribution choices), status. Bad input ends in one status, never an exception."""
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
        edits = state.edits()
        key = (tuple(prompts), sampling)
        deterministic = sampling.temperature == 0 or sampling.seed is not None
        top = 10 if self.engine.sae is not None else 0
        if deterministic and state.unsteered_key == key and state.unsteered is not None:
            base = state.unsteered
            yield {"unsteered": format_outputs(prompts, _texts(base))}
        else:
            base = None
            texts = [""] * len(prompts)
            for base in in_worker(lambda: self.engine.stream(tokens, sampling, (), top_latents=top)):
                for i, d in enumerate(base.deltas):
                    texts[i] += d
                yield {"unsteered": format_outputs(prompts, texts), "status": "generating (unsteered)…"}
            state.unsteered_key, state.unsteered = key, base
        assert base is not None and base.completions is not None
        shown, shown_edits = base, []
        if edits:
            texts = [""] * len(prompts)
            for shown in in_worker(lambda: self.engine.stream(tokens, sampling, edits, top_latents=top)):
                for i, d in enumerate(shown.deltas):
                    texts[i] += d
                yield {"steered": format_outputs(prompts, texts), "status": "generating (steered)…"}
            shown_edits = edits
            same = _texts(shown) == _texts(base)
            status = "Done." + (" The steered output equals the unsteered one: try a larger value." if same else "")
        else:
            status = "Done. No latents steered, so only the unsteered output was generated."
            yield {"steered": "(add a latent on the right to steer)"}
        out: dict[str, Any] = {"status": status}
        assert shown.completions is not None
        first = shown.completions[0]
        state.last_tokens = list(first.prompt_tokens) + list(first.tokens)
        state.last_prompt_len = len(first.prompt_tokens)
        state.last_edits = list(shown_edits)
        out["tokens"] = self.token_choices(state)
        if shown.output_latents is not None:
            out["latents"] = self.latent_rows(state, shown.output_latents)
        yield out

    def token_choices(self, state: SessionState) -> list[tuple[str, str]]:
        tok = self.engine.llm.tokenizer
        return [(f"{p - state.last_prompt_len + 1}: {tok.decode([state.last_tokens[p]])!r}", str(p))
                for p in range(state.last_prompt_len, len(state.last_tokens))]

    def latent_rows(self, state: SessionState, per_row: list[list[tuple[int, float]]]) -> list[list[Any]]:
        rows, latents = [], []
        for i, hits in enumerate(per_row):
            for latent, value in hits:
                mark = "  ◆ steered" if latent in state.steer else ""
                rows.append([i + 1, latent, round(value, 3), self.catalog.label(latent) + mark])
                latents.append(latent)
        state.table_latents = latents
        return rows

    # ------------------------------------------------------------------ chat
    def chat(self, state: SessionState, message: str, sampling: Sampling) -> Iterator[dict[str, Any]]:
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
        reply = ""
        edits = state.edits()
        for step in in_worker(lambda: self.engine.stream([tokens], sampling, edits, top_latents=0)):
            reply += step.deltas[0]
            yield {"chat": [*dialog, {"role": "assistant", "content": reply}], "status": "replying…"}
        state.chat = [*dialog, {"role": "assistant", "content": reply}]
        yield {"chat": copy.deepcopy(state.chat), "status": "Done."}

    # ------------------------------------------------------------------ attribution
    def attribute(self, state: SessionState, position: str | int | None, k: int) -> tuple[str, list[tuple[int, str]]]:
        """Markdown summary and (latent, row text) of the top k latents for the chosen token."""

        if self.engine.sae is None:
            raise ValueError("attribution needs an SAE: start the app with --sae SAE_DIR")
        if not state.last_tokens or position in (None, ""):
            raise ValueError("generate first, then pick a token of the output to explain")
        result = attribute(self.engine, state.last_tokens, int(position), state.last_edits)
        rows = []
        for latent, score, act in result.top(k):
            rows.append((latent, f"**{latent}** · {md_escape(self.catalog.label(latent))} · score {score:+.3f}"
                                 f" · max act {act:.2f}"))
        state.attr_latents = [r[0] for r in rows]
        negatives = ", ".join(f"{latent} ({score:+.2f})" for latent, score, _ in result.top(3, negative=True))
        summary = (f"Token {md_escape(repr(result.token_text))} at position {result.position}: logit - mean logit = "
                   f"{result.metric:.3f}. Scores: gradient of that with respect to each latent's activation, summed "
                   f"over positions (steering a latent by +1 changes it by about its score). "
                   f"Most negative: {negatives}.")
        return summary, rows


# --------------------------------------------------------------------------- the page
def build_app(engine: Engine, cfg: UiConfig):
    """The Gradio Blocks of the app (not launched)."""
    import gradio as gr

    app = WebApp(engine, cfg)
    n_slots, n_attr = cfg.steer_slots, 8
    has_sae = engine.sae is not None

    def info_md() -> str:
        lines = [f"**Model** `{engine.ckpt_dir}`"]
        if has_sae:
            lines.append(f"**SAE** `{engine.sae_dir}` at site `{engine.site}`, {engine.n_latents:,} latents · "
                         f"{engine.catalog.provenance()}")
        else:
            lines.append("No SAE loaded (start with `--sae SAE_DIR` to steer and attribute).")
        return "  \n".join(lines)

    def slot_updates(state: SessionState) -> list[Any]:
        out: list[Any] = []
        items = list(state.steer.items())
        for i in range(n_slots):
            if i < len(items):
                latent, value = items[i]
                lo, hi = app.slider_range(latent)
                label = engine.catalog.label(latent)
                out += [gr.update(visible=True),
                        gr.update(minimum=lo, maximum=hi, value=value, step=round((hi - lo) / 200, 6),
                                  label=f"latent {latent} · {label}" if label != UNLABELLED else f"latent {latent}")]
            else:
                out += [gr.update(visible=False), gr.update(value=0)]
        return out

    def fail(e: Exception) -> str:
        gr.Warning(str(e))
        return f"⚠ {e}"

    with gr.Blocks(title="llama3-sae", analytics_enabled=False) as blocks:
        state = gr.State(SessionState())
        gr.Markdown("## llama3-sae · steer a model with its SAE latents")
        gr.Markdown(info_md())
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            max_new = gr.Slider(1, cfg.max_new_tokens_limit, value=cfg.max_new_tokens, step=1, label="max new tokens",
                                elem_id="max-new-tokens")
            temperature = gr.Slider(0.0, 2.0, value=cfg.temperature, step=0.05, label="temperature (0 = greedy)",
                                    elem_id="temperature")
            top_p = gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.05, label="top-p", elem_id="top-p")
            seed = gr.Number(value=cfg.seed, precision=0, label="seed (empty = random)", elem_id="seed")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Text"):
                    prompts = gr.Textbox(lines=3, label=f"prompts (one per line, at most {cfg.max_batch})",
                                         placeholder="The delegates gathered at the", elem_id="prompts")
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Row():
                        unsteered = gr.Textbox(lines=8, label="unsteered", interactive=False, elem_id="unsteered")
                        steered = gr.Textbox(lines=8, label="steered", interactive=False, elem_id="steered")
                    latents_table = gr.Dataframe(headers=["prompt", "latent", "max act", "label"],
                                                 label="latents most active over the last output (click a row to "
                                                       "steer it)", interactive=False, elem_id="latents-table",
                                                 visible=has_sae)
                with gr.Tab("Chat"):
                    chatbot = gr.Chatbot(label="chat (uses the steering on the right)", height=360, elem_id="chatbot")
                    with gr.Row():
                        chat_msg = gr.Textbox(label="message", scale=4, elem_id="chat-message")
                        chat_send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                        chat_clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
                with gr.Accordion("Attribution: which latents made the model pick a token", open=False,
                                  visible=has_sae):
                    with gr.Row():
                        token_choice = gr.Dropdown(choices=[], label="token of the first prompt's last output",
                                                   elem_id="attr-token", scale=3)
                        attr_btn = gr.Button("Attribute", elem_id="attribute", scale=1)
                    attr_summary = gr.Markdown("", elem_id="attr-summary")
                    attr_rows, attr_texts, attr_buttons = [], [], []
                    for j in range(n_attr):
                        with gr.Row(visible=False) as row:
                            text = gr.Markdown("", elem_id=f"attr-text-{j}")
                            button = gr.Button("steer", size="sm", scale=0, elem_id=f"attr-steer-{j}")
                        attr_rows.append(row)
                        attr_texts.append(text)
                        attr_buttons.append(button)
            with gr.Column(scale=2, visible=has_sae):
                gr.Markdown("### Steering")
                with gr.Row():
                    search_box = gr.Textbox(label="search latents by label (or type an index)", scale=3,
                                            elem_id="search")
                    search_btn = gr.Button("Search", scale=1, elem_id="search-btn")
                # Custom values: a latent index can be typed here directly (checked when added).
                hits = gr.Dropdown(choices=[], label="matches (or type a latent index)", elem_id="search-hits",
                                   interactive=True, allow_custom_value=True)
                add_btn = gr.Button("Add as slider", elem_id="add-latent")
                steering_md = gr.Markdown(app.steering_summary(SessionState()), elem_id="steering-summary")
                slot_rows, slot_sliders, slot_removes = [], [], []
                for i in range(n_slots):
                    with gr.Row(visible=False) as row:
                        slider = gr.Slider(-cfg.default_range, cfg.default_range, value=0, step=0.1, label="",
                                           elem_id=f"steer-slider-{i}", scale=4)
                        remove = gr.Button("remove", size="sm", scale=0, elem_id=f"steer-remove-{i}")
                    slot_rows.append(row)
                    slot_sliders.append(slider)
                    slot_removes.append(remove)
                clear_btn = gr.Button("Clear steering", size="sm", elem_id="clear-steering")

        slot_outputs: list[Any] = [c for pair in zip(slot_rows, slot_sliders) for c in pair]
        steering_outputs = [state, steering_md, status, *slot_outputs]

        def steering_result(st: SessionState, message: str) -> list[Any]:
            return [st, app.steering_summary(st), message, *slot_updates(st)]

        # ---------------------------------------------------------------- steering events (no model)
        def do_search(st: SessionState, query: str):
            choices = app.search(query)
            note = "" if choices else ("No latent label matches." if (query or "").strip() else "")
            return st, gr.update(choices=choices, value=choices[0][1] if choices else None), note

        search_btn.click(do_search, [state, search_box], [state, hits, status], api_name="search")
        search_box.submit(do_search, [state, search_box], [state, hits, status], api_visibility="private")

        def do_add(st: SessionState, choice: str | None):
            try:
                text = str(choice if choice is not None else "").strip()
                if not text.isdigit():
                    raise ValueError("search for a latent and pick one of the matches (or type a latent index) first")
                message = app.add_latent(st, int(text))
            except ValueError as e:
                message = fail(e)
            return steering_result(st, message)

        add_btn.click(do_add, [state, hits], steering_outputs, api_name="add_latent")

        for i in range(n_slots):
            def on_input(st: SessionState, value: float, i: int = i):
                app.set_slot(st, i, value)
                return st, app.steering_summary(st)

            def on_remove(st: SessionState, i: int = i):
                app.remove_slot(st, i)
                return steering_result(st, "")

            # `input` fires on the user's moves only, not when a slot is refilled by the server.
            slot_sliders[i].input(on_input, [state, slot_sliders[i]], [state, steering_md], api_name=f"set_slider_{i}")
            slot_removes[i].click(on_remove, [state], steering_outputs, api_name=f"remove_slider_{i}")

        def do_clear(st: SessionState):
            st.steer.clear()
            return steering_result(st, "Steering cleared.")

        clear_btn.click(do_clear, [state], steering_outputs, api_name="clear_steering")

        def on_table_select(st: SessionState, evt: gr.SelectData):
            try:
                row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
                message = app.add_latent(st, st.table_latents[row])
            except (ValueError, IndexError) as e:
                message = fail(ValueError(str(e)))
            return steering_result(st, message)

        # Gradio finds the SelectData parameter by its annotation, which this module's postponed
        # annotations leave as a string it cannot resolve (gradio is imported inside this function).
        on_table_select.__annotations__["evt"] = gr.SelectData
        latents_table.select(on_table_select, [state], steering_outputs, api_visibility="private")

        for j in range(n_attr):
            def on_attr_steer(st: SessionState, j: int = j):
                try:
                    message = app.add_latent(st, st.attr_latents[j])
                except (ValueError, IndexError) as e:
                    message = fail(ValueError(str(e)))
                return steering_result(st, message)

            attr_buttons[j].click(on_attr_steer, [state], steering_outputs, api_name=f"steer_attributed_{j}")

        # ---------------------------------------------------------------- model events (queued)
        model_queue = {"concurrency_limit": cfg.concurrency, "concurrency_id": MODEL_QUEUE}

        def do_generate(st: SessionState, text: str, mx: Any, temp: Any, tp: Any, sd: Any):
            try:
                sampling = sampling_of(mx, temp, tp, sd)
            except ValueError as e:
                yield st, gr.skip(), gr.skip(), gr.skip(), gr.skip(), fail(e)
                return
            shown: dict[str, Any] = {}

            def pack(part: dict[str, Any]) -> tuple:
                return (st,
                        part.get("unsteered", gr.skip()),
                        part.get("steered", gr.skip()),
                        part["latents"] if "latents" in part else gr.skip(),
                        gr.update(choices=part["tokens"], value=part["tokens"][0][1] if part["tokens"] else None)
                        if "tokens" in part else gr.skip(),
                        part.get("status", gr.skip()))

            for part in app.generate(st, text, sampling):
                shown.update(part)
                yield pack(part)
            # Once more with everything: API clients read only the last message of a stream.
            yield pack(shown)

        gen_outputs = [state, unsteered, steered, latents_table, token_choice, status]
        gen_inputs = [state, prompts, max_new, temperature, top_p, seed]
        generate_btn.click(do_generate, gen_inputs, gen_outputs, api_name="generate", **model_queue)

        def do_chat(st: SessionState, message: str, mx: Any, temp: Any, tp: Any, sd: Any):
            try:
                sampling = sampling_of(mx, temp, tp, sd)
            except ValueError as e:
                yield st, gr.skip(), gr.skip(), fail(e)
                return
            def pack(part: dict[str, Any]) -> tuple:
                # The message box empties once the reply starts.
                box = "" if "chat" in part else gr.skip()
                return st, part.get("chat", gr.skip()), box, part.get("status", gr.skip())

            shown: dict[str, Any] = {}
            for part in app.chat(st, message, sampling):
                shown.update(part)
                yield pack(part)
            yield pack(shown)  # everything once more, for API clients (they read the last message)

        chat_inputs = [state, chat_msg, max_new, temperature, top_p, seed]
        chat_send.click(do_chat, chat_inputs, [state, chatbot, chat_msg, status], api_name="chat", **model_queue)
        chat_msg.submit(do_chat, chat_inputs, [state, chatbot, chat_msg, status], api_visibility="private",
                        **model_queue)

        def do_chat_clear(st: SessionState):
            st.chat = []
            return st, [], "Conversation cleared."

        chat_clear.click(do_chat_clear, [state], [state, chatbot, status], api_name="clear_chat")

        def do_attribute(st: SessionState, position: str | None):
            try:
                summary, rows = app.attribute(st, position, n_attr)
            except ValueError as e:
                return [st, fail(e), gr.skip()] + [gr.skip()] * (2 * n_attr)
            updates: list[Any] = []
            for j in range(n_attr):
                if j < len(rows):
                    updates += [gr.update(visible=True), rows[j][1]]
                else:
                    updates += [gr.update(visible=False), ""]
            return [st, "Attribution done.", summary] + updates

        attr_outputs = [state, status, attr_summary] + [c for pair in zip(attr_rows, attr_texts) for c in pair]
        attr_btn.click(do_attribute, [state, token_choice], attr_outputs, api_name="attribute", **model_queue)

    blocks.queue(default_concurrency_limit=8, max_size=cfg.queue_size)
    return blocks


def launch(blocks, cfg: UiConfig, *, prevent_thread_lock: bool = False, quiet: bool = False):
    """Start the server as ``cfg`` says (127.0.0.1 unless told otherwise)."""
    if cfg.host not in LOOPBACK:
        print(f"warning: listening on {cfg.host}: anyone who can reach this machine can use the app and the model "
              "(no password). Use the default 127.0.0.1 to keep it local.", file=sys.stderr)
    if cfg.share:
        print("warning: --share publishes the app through a public gradio.live link.", file=sys.stderr)
    return blocks.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, ssr_mode=False,
                         prevent_thread_lock=prevent_thread_lock, quiet=quiet, footer_links=[])


def main_ui(argv: list[str] | None = None, prog: str = "llama3-sae ui") -> int:
    cfg = parse_config(UiConfig, argv, prog, __doc__, usage_errors=True,
                       epilog="example:\n  llama3-sae ui --ckpt-dir DIR --sae SAE_DIR   # then open http://127.0.0.1:7860")
    try:
        import gradio  # noqa: F401
    except ImportError:  # an optional dependency: say how to get it rather than show a traceback
        raise SystemExit("llama3-sae ui needs Gradio 6: pip install 'llama3-sae[web]' "
                         "(or pip install 'gradio>=6')") from None
    engine = Engine.load(cfg, cfg.sae, cfg.site, max_batch_size=cfg.max_batch)
    launch(build_app(engine, cfg), cfg)
    return 0
