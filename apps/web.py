"""``llama3-sae ui``: the web app (Gradio 6). Steer a model with SAE latents from a browser.

* Text: prompts one per line, streamed, unsteered and steered in one batch; the tokens shaded by a
  latent's activation with the steered tokens that differ outlined; the latents most active over the
  output (click a row for its page); attribution of a generated token to the latents.
* Chat: a conversation with the same steering, and the unsteered reply beside it.
* Latent pages: label, certainty, scores, density, top examples and quantile samples shaded token by
  token, the output tokens it promotes and suppresses, a steer button; opened from search results, the
  latents table and attribution rows.
* Steering: search latents by label, add them as sliders (+-4x the latent's largest activation), or type
  any value in a slider's box (the slider widens to hold it). The applied values are always shown.

Every browser session has its own steering (a ``gr.State``); nothing is ever set on the shared SAE or
model outside one generation, so two users never see each other's settings. The server listens on
127.0.0.1 unless ``--host`` says otherwise; ``--share`` (a public Gradio link) is off unless asked for.
Model calls go through one queue with ``--concurrency`` of them running at once. The handlers are
``apps.web_app``'s; this module lays out the panels and wires them.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llama3_sae.config import parse_config

from .engine import Engine
from .latent_page import PAGE_CSS
from .web_app import SessionState, UiConfig, WebApp, sampling_of, slider_label

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MODEL_QUEUE = "model"
N_ATTR = 8

CSS = PAGE_CSS + """
.token-view .tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 2px 0; }
.token-view .act { display: inline-block; min-width: 6em; color: #888; }
"""


def _hide_slider_boxes(n: int) -> str:
    """CSS that hides each steering slider's own number box: it clamps typed values to the range without
    telling the server, so the value box beside the slider (which widens the range) takes typed values."""
    return "".join(f"#steer-slider-{i} input[type=number] {{ display: none; }}\n" for i in range(n))


@dataclass
class Page:
    """The components the wiring needs, by name."""

    c: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.c[name]
        except KeyError:
            raise AttributeError(name) from None


# --------------------------------------------------------------------------- panels
def _header(gr: Any, app: WebApp, cfg: UiConfig) -> dict[str, Any]:
    engine = app.engine
    lines = [f"**Model** `{engine.ckpt_dir}`"]
    if engine.sae is not None:
        lines.append(f"**SAE** `{engine.sae_dir}` at site `{engine.site}`, {engine.n_latents:,} latents · "
                     f"{engine.catalog.provenance()}")
    else:
        lines.append("No SAE loaded (start with `--sae SAE_DIR` to steer, open latent pages and attribute).")
    gr.Markdown("## llama3-sae · look inside a model and steer it with its SAE latents")
    gr.Markdown("  \n".join(lines))
    out = {"status": gr.Markdown("", elem_id="status")}
    with gr.Row():
        out["max_new"] = gr.Slider(1, cfg.max_new_tokens_limit, value=cfg.max_new_tokens, step=1,
                                   label="max new tokens", elem_id="max-new-tokens")
        out["temperature"] = gr.Slider(0.0, 2.0, value=cfg.temperature, step=0.05, label="temperature (0 = greedy)",
                                       elem_id="temperature")
        out["top_p"] = gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.05, label="top-p", elem_id="top-p")
        out["seed"] = gr.Number(value=cfg.seed, precision=0, label="seed (empty = random)", elem_id="seed")
    return out


def _text_tab(gr: Any, cfg: UiConfig, has_sae: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["prompts"] = gr.Textbox(lines=3, label=f"prompts (one per line, at most {cfg.max_batch})",
                                placeholder="The delegates gathered at the", elem_id="prompts")
    out["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
    with gr.Row():
        out["unsteered"] = gr.Textbox(lines=6, label="unsteered", interactive=False, elem_id="unsteered")
        out["steered"] = gr.Textbox(lines=6, label="steered", interactive=False, elem_id="steered")
    out["highlight"] = gr.Dropdown(choices=[], label="shade the tokens by latent", elem_id="highlight",
                                   visible=has_sae, allow_custom_value=True)
    out["view"] = gr.HTML("", elem_id="token-view")
    out["table"] = gr.Dataframe(headers=["prompt", "latent", "max act", "label"],
                                label="latents most active over the steered output (click a row for its page)",
                                interactive=False, elem_id="latents-table", visible=has_sae)
    with gr.Accordion("Attribution: which latents made the model pick a token", open=False, visible=has_sae):
        with gr.Row():
            out["attr_token"] = gr.Dropdown(choices=[], label="token of the first prompt's output",
                                            elem_id="attr-token", scale=3)
            out["attr_by"] = gr.Radio([("activation x gradient", "contribution"), ("gradient only", "gradient")],
                                      value="contribution", label="rank by", elem_id="attr-by", scale=2)
            out["attr_btn"] = gr.Button("Attribute", elem_id="attribute", scale=1)
        out["attr_summary"] = gr.Markdown("", elem_id="attr-summary")
        rows, texts, opens, steers = [], [], [], []
        for j in range(N_ATTR):
            with gr.Row(visible=False) as row:
                texts.append(gr.Markdown("", elem_id=f"attr-text-{j}"))
                opens.append(gr.Button("page", size="sm", scale=0, elem_id=f"attr-open-{j}"))
                steers.append(gr.Button("steer", size="sm", scale=0, elem_id=f"attr-steer-{j}"))
            rows.append(row)
        out.update(attr_rows=rows, attr_texts=texts, attr_opens=opens, attr_steers=steers)
    return out


def _chat_tab(gr: Any) -> dict[str, Any]:
    out = {"chatbot": gr.Chatbot(label="chat (with the steering on the right)", height=360, elem_id="chatbot")}
    with gr.Row():
        out["chat_msg"] = gr.Textbox(label="message", scale=4, elem_id="chat-message")
        out["chat_send"] = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        out["chat_clear"] = gr.Button("Clear", scale=1, elem_id="chat-clear")
    out["chat_unsteered"] = gr.Textbox(lines=4, label="the last reply without steering (same conversation, same "
                                       "seed)", interactive=False, elem_id="chat-unsteered")
    return out


def _contrast_tab(gr: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with gr.Row():
        out["con_a"] = gr.Textbox(lines=5, label="set A (one text per line)", elem_id="contrast-a")
        out["con_b"] = gr.Textbox(lines=5, label="set B (one per line; empty: compare A with the corpus)",
                                  elem_id="contrast-b")
    with gr.Row():
        out["con_query"] = gr.Textbox(label="rerank by label words (optional)", elem_id="contrast-query", scale=3)
        out["con_dir"] = gr.Radio([("stronger in A", "a"), ("stronger in B", "b"), ("either", "both")], value="a",
                                  label="latents", elem_id="contrast-direction", scale=2)
        out["con_btn"] = gr.Button("Contrast", variant="primary", elem_id="contrast-btn", scale=1)
    out["con_summary"] = gr.Markdown("", elem_id="contrast-summary")
    out["con_table"] = gr.Dataframe(headers=["latent", "label", "mean A", "mean B (or corpus)", "t (or lift)",
                                             "p adj"], interactive=False, elem_id="contrast-table")
    return out


def _geometry_tab(gr: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with gr.Row():
        out["geo_other"] = gr.Textbox(label="another SAE's directory (another width, seed or layer)", scale=4,
                                      elem_id="geometry-other")
        out["geo_btn"] = gr.Button("Match latents", elem_id="geometry-btn", scale=1)
    out["geo_summary"] = gr.Markdown("", elem_id="geometry-summary")
    out["geo_map"] = gr.Image(label="decoder directions in 2-D", type="filepath", elem_id="geometry-map")
    return out


def _latent_tab(gr: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with gr.Row():
        out["page_latent"] = gr.Number(label="latent", precision=0, elem_id="page-latent", scale=2)
        out["page_open"] = gr.Button("Open", elem_id="page-open", scale=1)
        out["page_steer"] = gr.Button("Steer this latent", elem_id="page-steer", scale=1)
    out["page"] = gr.HTML("<p>Open a latent from the search, the latents table or an attribution row.</p>",
                          elem_id="latent-page")
    return out


def _steering_panel(gr: Any, app: WebApp, cfg: UiConfig) -> dict[str, Any]:
    gr.Markdown("### Steering")
    out: dict[str, Any] = {}
    with gr.Row():
        out["search"] = gr.Textbox(label="search latents by label (or type an index)", scale=3, elem_id="search")
        out["search_btn"] = gr.Button("Search", scale=1, elem_id="search-btn")
    # Custom values: a latent index can be typed here directly (checked when added).
    out["hits"] = gr.Dropdown(choices=[], label="matches (or type a latent index)", elem_id="search-hits",
                              interactive=True, allow_custom_value=True)
    with gr.Row():
        out["add"] = gr.Button("Add as slider", elem_id="add-latent")
        out["open"] = gr.Button("Open its page", elem_id="open-latent")
    out["summary"] = gr.Markdown(app.steering_summary(SessionState()), elem_id="steering-summary")
    out["when"] = gr.Textbox(label="steer only where (e.g. 12>0.75 & 5<1; empty: at every token)",
                             elem_id="steer-when")
    rows, sliders, values, removes = [], [], [], []
    for i in range(cfg.steer_slots):
        with gr.Row(visible=False) as row:
            sliders.append(gr.Slider(-cfg.default_range, cfg.default_range, value=0, step=0.1, label="",
                                     elem_id=f"steer-slider-{i}", scale=4))
            values.append(gr.Number(value=0, label="value", elem_id=f"steer-value-{i}", scale=1, min_width=80))
            removes.append(gr.Button("remove", size="sm", scale=0, elem_id=f"steer-remove-{i}"))
        rows.append(row)
    out.update(slot_rows=rows, slot_sliders=sliders, slot_values=values, slot_removes=removes)
    out["clear"] = gr.Button("Clear steering", size="sm", elem_id="clear-steering")
    return out


def _layout(gr: Any, app: WebApp, cfg: UiConfig) -> Page:
    has_sae = app.engine.sae is not None
    c: dict[str, Any] = {"state": gr.State(SessionState())}
    c.update(_header(gr, app, cfg))
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Tabs(elem_id="tabs") as tabs:
                c["tabs"] = tabs
                with gr.Tab("Text", id="text"):
                    c.update(_text_tab(gr, cfg, has_sae))
                with gr.Tab("Chat", id="chat"):
                    c.update(_chat_tab(gr))
                with gr.Tab("Contrast", id="contrast", visible=has_sae):
                    c.update(_contrast_tab(gr))
                with gr.Tab("Geometry", id="geometry", visible=has_sae):
                    c.update(_geometry_tab(gr))
                with gr.Tab("Latent", id="latent", visible=has_sae):
                    c.update(_latent_tab(gr))
        with gr.Column(scale=2, visible=has_sae):
            c.update(_steering_panel(gr, app, cfg))
    return Page(c)


# --------------------------------------------------------------------------- wiring
def _fail(gr: Any, e: Exception) -> str:
    gr.Warning(str(e))
    return f"⚠ {e}"


def _slot_updates(gr: Any, app: WebApp, st: SessionState, n_slots: int) -> list[Any]:
    """Row, slider and value box of every slot, from the session's applied values."""
    out: list[Any] = []
    items = list(st.steer.items())
    for i in range(n_slots):
        if i < len(items):
            latent, value = items[i]
            bound = app.slider_bound(st, latent)
            out += [gr.update(visible=True),
                    gr.update(minimum=-bound, maximum=bound, value=value, step=round(bound / 100, 6),
                              label=slider_label(app.catalog, latent)),
                    gr.update(value=value)]
        else:
            out += [gr.update(visible=False), gr.update(value=0), gr.update(value=0)]
    return out


def _wire_steering(gr: Any, app: WebApp, p: Page, n_slots: int) -> list[Any]:
    """Search, add, sliders, value boxes, remove, clear. Returns the outputs every steering change updates."""
    slot_outputs = [x for trio in zip(p.slot_rows, p.slot_sliders, p.slot_values) for x in trio]
    outputs = [p.state, p.summary, p.status, *slot_outputs]

    def result(st: SessionState, message: str) -> list[Any]:
        return [st, app.steering_summary(st), message, *_slot_updates(gr, app, st, n_slots)]

    def do_search(st: SessionState, query: str):
        choices = app.search(query)
        note = "" if choices else ("No latent label matches." if (query or "").strip() else "")
        return st, gr.update(choices=choices, value=choices[0][1] if choices else None), note

    p.search_btn.click(do_search, [p.state, p.search], [p.state, p.hits, p.status], api_name="search")
    p.search.submit(do_search, [p.state, p.search], [p.state, p.hits, p.status], api_visibility="private")

    def do_add(st: SessionState, choice: str | None):
        try:
            text = str(choice if choice is not None else "").strip()
            if not text.isdigit():
                raise ValueError("search for a latent and pick one of the matches (or type a latent index) first")
            message = app.add_latent(st, int(text))
        except ValueError as e:
            message = _fail(gr, e)
        return result(st, message)

    p.add.click(do_add, [p.state, p.hits], outputs, api_name="add_latent")
    for i in range(n_slots):
        def on_value(st: SessionState, value: Any, i: int = i):
            latent = app.slot_latent(st, i)
            message = ""
            if latent is not None:
                try:
                    app.set_value(st, latent, value)
                except ValueError as e:
                    message = _fail(gr, e)  # refused: the boxes go back to the applied value below
            return result(st, message)

        def on_remove(st: SessionState, i: int = i):
            app.remove_slot(st, i)
            return result(st, "")

        # `input` fires on the user's moves only, not when the server refills a slot.
        p.slot_sliders[i].input(on_value, [p.state, p.slot_sliders[i]], outputs, api_name=f"set_slider_{i}")
        p.slot_values[i].submit(on_value, [p.state, p.slot_values[i]], outputs, api_name=f"set_value_{i}")
        p.slot_values[i].blur(on_value, [p.state, p.slot_values[i]], outputs, api_visibility="private")
        p.slot_removes[i].click(on_remove, [p.state], outputs, api_name=f"remove_slider_{i}")

    def do_clear(st: SessionState):
        st.steer.clear()
        return result(st, "Steering cleared.")

    p.clear.click(do_clear, [p.state], outputs, api_name="clear_steering")

    def on_when(st: SessionState, text: str):
        try:
            message = app.set_condition(st, text)
        except ValueError as e:
            message = _fail(gr, e)
        return result(st, message)

    p.when.submit(on_when, [p.state, p.when], outputs, api_name="set_condition")
    p.when.blur(on_when, [p.state, p.when], outputs, api_visibility="private")

    def add_from(st: SessionState, latent: Any):
        try:
            message = app.add_latent(st, int(latent))
        except (TypeError, ValueError) as e:
            message = _fail(gr, ValueError(str(e)))
        return result(st, message)

    p.page_steer.click(add_from, [p.state, p.page_latent], outputs, api_name="steer_page_latent")
    for j in range(N_ATTR):
        def on_attr_steer(st: SessionState, j: int = j):
            return add_from(st, st.attr_latents[j] if j < len(st.attr_latents) else None)

        p.attr_steers[j].click(on_attr_steer, [p.state], outputs, api_name=f"steer_attributed_{j}")
    return outputs


def _wire_pages(gr: Any, app: WebApp, p: Page) -> None:
    """Opening a latent's page: from its number, the search hits, a table row or an attribution row."""
    outputs = [p.page_latent, p.page, p.tabs, p.status]

    def show(latent: Any):
        try:
            page = app.latent_page(latent)
        except ValueError as e:
            return gr.skip(), gr.skip(), gr.skip(), _fail(gr, e)
        return int(str(latent).strip()), page, gr.Tabs(selected="latent"), ""

    p.page_open.click(show, [p.page_latent], outputs, api_name="latent_page")
    p.open.click(show, [p.hits], outputs, api_visibility="private")

    def opens_row(rows_of: Callable[[SessionState], list[int]]):
        """A table's select handler that opens the page of the clicked row's latent."""
        def on_select(st: SessionState, evt: gr.SelectData):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else int(evt.index)
            latents = rows_of(st)
            return show(latents[row]) if 0 <= row < len(latents) else (gr.skip(),) * 3 + ("",)

        # Gradio finds the SelectData parameter by its annotation, which this module's postponed annotations
        # leave as a string it cannot resolve.
        on_select.__annotations__["evt"] = gr.SelectData
        return on_select

    p.table.select(opens_row(lambda st: st.table_latents), [p.state], outputs, api_visibility="private")
    p.con_table.select(opens_row(lambda st: st.contrast_latents), [p.state], outputs, api_visibility="private")
    for j in range(N_ATTR):
        def on_attr_open(st: SessionState, j: int = j):
            return show(st.attr_latents[j]) if j < len(st.attr_latents) else (gr.skip(),) * 3 + ("",)

        p.attr_opens[j].click(on_attr_open, [p.state], outputs, api_visibility="private")


def _model_queue(cfg: UiConfig) -> dict[str, Any]:
    """The event options of everything that runs the model: one queue, --concurrency at a time."""
    return {"concurrency_limit": cfg.concurrency, "concurrency_id": MODEL_QUEUE}


def _wire_generate(gr: Any, app: WebApp, p: Page, cfg: UiConfig) -> None:
    """Generation and the token view (queued: they run the model)."""
    queue, sampling_inputs = _model_queue(cfg), [p.max_new, p.temperature, p.top_p, p.seed]

    def do_generate(st: SessionState, text: str, mx: Any, temp: Any, tp: Any, sd: Any):
        try:
            sampling = sampling_of(mx, temp, tp, sd)
        except ValueError as e:
            yield (st,) + (gr.skip(),) * 6 + (_fail(gr, e),)
            return
        shown: dict[str, Any] = {}

        def pack(part: dict[str, Any]) -> tuple:
            tokens, highlight = part.get("tokens"), part.get("highlight_choices")
            return (st, part.get("unsteered", gr.skip()), part.get("steered", gr.skip()),
                    part["latents"] if "latents" in part else gr.skip(),
                    gr.update(choices=tokens, value=tokens[0][1] if tokens else None) if tokens is not None
                    else gr.skip(),
                    part.get("view", gr.skip()),
                    gr.update(choices=highlight, value=str(st.highlight) if st.highlight is not None else None)
                    if highlight is not None else gr.skip(),
                    part.get("status", gr.skip()))

        for part in app.generate(st, text, sampling):
            shown.update(part)
            yield pack(part)
        yield pack(shown)  # everything once more: API clients read only the last message of a stream

    gen_outputs = [p.state, p.unsteered, p.steered, p.table, p.attr_token, p.view, p.highlight, p.status]
    p.generate.click(do_generate, [p.state, p.prompts, *sampling_inputs], gen_outputs, api_name="generate", **queue)

    def do_highlight(st: SessionState, latent: Any):
        try:
            return st, app.token_view(st, None if latent in (None, "") else int(str(latent).split()[0])), ""
        except ValueError as e:
            return st, gr.skip(), _fail(gr, e)

    p.highlight.input(do_highlight, [p.state, p.highlight], [p.state, p.view, p.status], api_name="highlight",
                      **queue)


def _wire_chat_contrast_attribution(gr: Any, app: WebApp, p: Page, cfg: UiConfig) -> None:
    """Chat, contrast and attribution: the other events that run the model (queued)."""
    queue, sampling_inputs = _model_queue(cfg), [p.max_new, p.temperature, p.top_p, p.seed]

    def do_chat(st: SessionState, message: str, mx: Any, temp: Any, tp: Any, sd: Any):
        try:
            sampling = sampling_of(mx, temp, tp, sd)
        except ValueError as e:
            yield st, gr.skip(), gr.skip(), gr.skip(), _fail(gr, e)
            return

        def pack(part: dict[str, Any]) -> tuple:
            box = "" if "chat" in part else gr.skip()  # the message box empties once the reply starts
            return st, part.get("chat", gr.skip()), box, part.get("unsteered", gr.skip()), part.get("status", gr.skip())

        shown: dict[str, Any] = {}
        for part in app.chat(st, message, sampling):
            shown.update(part)
            yield pack(part)
        yield pack(shown)

    chat_inputs = [p.state, p.chat_msg, *sampling_inputs]
    chat_outputs = [p.state, p.chatbot, p.chat_msg, p.chat_unsteered, p.status]
    p.chat_send.click(do_chat, chat_inputs, chat_outputs, api_name="chat", **queue)
    p.chat_msg.submit(do_chat, chat_inputs, chat_outputs, api_visibility="private", **queue)

    def do_chat_clear(st: SessionState):
        st.chat = []
        return st, [], "", "Conversation cleared."

    p.chat_clear.click(do_chat_clear, [p.state], [p.state, p.chatbot, p.chat_unsteered, p.status],
                       api_name="clear_chat")

    def do_attribute(st: SessionState, position: str | None, by: str):
        try:
            summary, rows = app.attribute(st, position, N_ATTR, by or "contribution")
        except ValueError as e:
            return [st, _fail(gr, e), gr.skip()] + [gr.skip()] * (2 * N_ATTR)
        updates: list[Any] = []
        for j in range(N_ATTR):
            updates += [gr.update(visible=True), rows[j][1]] if j < len(rows) else [gr.update(visible=False), ""]
        return [st, "Attribution done.", summary] + updates

    def do_contrast(st: SessionState, a: str, b: str, query: str, direction: str):
        try:
            summary, rows = app.contrast(st, a, b, query, direction or "a")
        except ValueError as e:
            return st, gr.skip(), gr.skip(), _fail(gr, e)
        return st, summary, rows, "Contrast done."

    p.con_btn.click(do_contrast, [p.state, p.con_a, p.con_b, p.con_query, p.con_dir],
                    [p.state, p.con_summary, p.con_table, p.status], api_name="contrast", **queue)

    def do_geometry(other: str):
        try:
            summary, image = app.geometry(other, Path(tempfile.mkdtemp(prefix="llama3-sae-geometry-")))
        except (ValueError, OSError) as e:
            return gr.skip(), gr.skip(), _fail(gr, ValueError(str(e)))
        return summary, image, "Geometry done."

    p.geo_btn.click(do_geometry, [p.geo_other], [p.geo_summary, p.geo_map, p.status], api_name="geometry")

    attr_outputs = [p.state, p.status, p.attr_summary] + [x for pair in zip(p.attr_rows, p.attr_texts) for x in pair]
    p.attr_btn.click(do_attribute, [p.state, p.attr_token, p.attr_by], attr_outputs, api_name="attribute", **queue)


def build_app(engine: Engine, cfg: UiConfig):
    """The Gradio Blocks of the app (not launched)."""
    import gradio as gr  # noqa: PLC0415 (an optional dependency: the rest of the package runs without it)

    app = WebApp(engine, cfg)
    with gr.Blocks(title="llama3-sae", analytics_enabled=False) as blocks:
        page = _layout(gr, app, cfg)
        _wire_steering(gr, app, page, cfg.steer_slots)
        _wire_pages(gr, app, page)
        _wire_generate(gr, app, page, cfg)
        _wire_chat_contrast_attribution(gr, app, page, cfg)
    blocks.queue(default_concurrency_limit=8, max_size=cfg.queue_size)
    blocks.css_for_launch = CSS + _hide_slider_boxes(cfg.steer_slots)
    return blocks


def launch(blocks, cfg: UiConfig, *, prevent_thread_lock: bool = False, quiet: bool = False):
    """Start the server as ``cfg`` says (127.0.0.1 unless told otherwise)."""
    if cfg.host not in LOOPBACK:
        print(f"warning: listening on {cfg.host}: anyone who can reach this machine can use the app and the model "
              "(no password). Use the default 127.0.0.1 to keep it local.", file=sys.stderr)
    if cfg.share:
        print("warning: --share publishes the app through a public gradio.live link.", file=sys.stderr)
    return blocks.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, ssr_mode=False,
                         prevent_thread_lock=prevent_thread_lock, quiet=quiet, footer_links=[],
                         css=getattr(blocks, "css_for_launch", None))


def main_ui(argv: list[str] | None = None, prog: str = "llama3-sae ui") -> int:
    cfg = parse_config(UiConfig, argv, prog, __doc__, usage_errors=True,
                       epilog="example:\n  llama3-sae ui --ckpt-dir DIR --sae SAE_DIR   # then open http://127.0.0.1:7860")
    try:
        import gradio  # noqa: F401, PLC0415
    except ImportError:  # an optional dependency: say how to get it rather than show a traceback
        raise SystemExit("llama3-sae ui needs Gradio 6: pip install 'llama3-sae[web]' "
                         "(or pip install 'gradio>=6')") from None
    # Twice the prompts: each runs unsteered and steered in one batch.
    engine = Engine.load(cfg, cfg.sae, cfg.site, max_batch_size=2 * cfg.max_batch)
    launch(build_app(engine, cfg), cfg)
    return 0
