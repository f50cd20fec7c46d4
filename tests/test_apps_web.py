"""The web app: its handlers (bad input, steering, caching, attribution), two concurrent sessions
through the real server and queue, and the page itself in headless Chromium (Playwright)."""

from __future__ import annotations

import shutil
import socket
import threading

import pytest

pytest.importorskip("llama_models")

from apps_support import build_env  # noqa: E402

from apps.engine import Engine, Sampling  # noqa: E402
from apps.web_app import SessionState, UiConfig, WebApp, parse_prompts  # noqa: E402
from sae import Edit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GREEDY = Sampling(temperature=0.0, top_p=0.9, seed=None, max_new_tokens=8)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.getbasetemp() / "apps-env")


@pytest.fixture(scope="module")
def cfg(env):
    # concurrency 2: two sessions' generations are in the server at once (the engine serialises the model).
    return UiConfig(ckpt_dir=env.ckpt, sae=env.sae, device="cpu", model_dtype="fp32", max_seq_len=128, max_batch=2,
                    concurrency=2, max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def engine(env, cfg):
    return Engine.load(cfg, cfg.sae, max_batch_size=2 * cfg.max_batch)  # as main_ui: unsteered + steered rows


@pytest.fixture(scope="module")
def app(engine, cfg):
    return WebApp(engine, cfg)


def _drain(gen) -> dict:
    """Merge every update a handler yields (later values win), as the page would show them."""
    shown: dict = {}
    for part in gen:
        shown.update(part)
    return shown


# --------------------------------------------------------------------------- handlers
def test_bad_input_gets_a_message_not_a_crash(app):
    st = SessionState()
    assert _drain(app.generate(st, "   \n  ", GREEDY)) == {"status": "Type a prompt first (one per line)."}
    out = _drain(app.generate(st, "a\nb\nc", GREEDY))
    assert "3 prompts" in out["status"] and "at most 2" in out["status"] and "unsteered" not in out
    out = _drain(app.generate(st, "word " * 200, GREEDY))
    assert "Cannot complete" in out["status"] and "context of 128 tokens" in out["status"]
    assert _drain(app.chat(st, "  ", GREEDY)) == {"status": "Type a message first."}
    with pytest.raises(ValueError, match="generate first"):
        app.attribute(st, None, 5)
    with pytest.raises(ValueError, match="out of range"):
        app.add_latent(st, 10_000)
    assert parse_prompts(" x \n\n y ") == ["x", "y"]


def test_generate_runs_unsteered_and_steered_rows_in_one_batch(app, engine):
    st = SessionState()
    prompts = ["The delegates gathered at the", "Hello"]
    out = _drain(app.generate(st, "\n".join(prompts), GREEDY))
    base = engine.complete(prompts, GREEDY)
    assert out["unsteered"] == "\n\n".join(f"[{i + 1}] {p}{c.text}" for i, (p, c) in enumerate(zip(prompts, base)))
    assert "No latents steered" in out["status"]
    message = app.add_latent(st, 3, 40.0)
    assert "steering latent 3" in message and st.steer == {3: 40.0}
    calls = []
    real_stream = engine.stream

    def counting(rows, sampling, edits=(), **kw):
        calls.append((len(rows), list(edits)))
        return real_stream(rows, sampling, edits, **kw)

    engine.stream = counting
    try:
        out = _drain(app.generate(st, "\n".join(prompts), GREEDY))
    finally:
        del engine.stream
    # One generation of four rows: the prompts unsteered, then the same prompts with the edit on rows 2 and 3.
    assert calls == [(4, [Edit(3, "add", 40.0, rows=(2, 3))])]
    steered = engine.complete(prompts, GREEDY, [Edit(3, "add", 40.0)])
    assert out["steered"] == "\n\n".join(f"[{i + 1}] {p}{c.text}" for i, (p, c) in enumerate(zip(prompts, steered)))
    assert out["unsteered"] == "\n\n".join(f"[{i + 1}] {p}{c.text}" for i, (p, c) in enumerate(zip(prompts, base)))
    assert out["steered"] != out["unsteered"]
    # The latents table lists the steered latent, marked; attribution choices are the generated tokens.
    assert any(row[1] == 3 and "◆ steered" in row[3] for row in out["latents"])
    assert len(out["tokens"]) == len(steered[0].tokens)
    summary, rows = app.attribute(st, out["tokens"][0][1], 4)
    assert "logit - mean logit" in summary and "activation x gradient" in summary
    assert len(rows) == 4 and st.attr_latents == [r[0] for r in rows]
    _, by_grad = app.attribute(st, out["tokens"][0][1], 4, by="gradient")
    assert "gradient only" not in summary and [r[0] for r in by_grad] != [] and st.attr_latents == [r[0] for r in by_grad]
    # The token view: every token of both rows of both prompts, shaded by the highlighted latent (3).
    assert st.highlight == 3 and out["view"].count('class="tokens"') == 4
    app.remove_slot(st, 0)
    assert st.steer == {} and st.edits() == []


def test_seeded_sampling_gives_the_steered_row_the_unsteered_rows_seed(app, engine):
    """Sampled, not greedy: the unsteered text of a batched run equals a run of the prompt alone with the same
    seed, and so does the steered text with the edit (row n + i samples with the seed of row i)."""
    sampled = Sampling(temperature=1.0, top_p=1.0, seed=7, max_new_tokens=8)
    st = SessionState()
    app.add_latent(st, 3, 40.0)
    out = _drain(app.generate(st, "Hello", sampled))
    assert out["unsteered"] == "Hello" + engine.complete(["Hello"], sampled)[0].text
    assert out["steered"] == "Hello" + engine.complete(["Hello"], sampled, [Edit(3, "add", 40.0)])[0].text


def test_a_value_beyond_the_slider_widens_it_and_a_bad_one_changes_nothing(app):
    st = SessionState()
    app.add_latent(st, 3)
    bound = app.slider_bound(st, 3)
    assert bound == pytest.approx(app.catalog.slider_range(3, app.cfg.default_range, 4.0)[1])
    app.set_value(st, 3, 6 * bound)
    assert st.steer[3] == 6 * bound and app.slider_bound(st, 3) == 6 * bound  # shown == applied
    assert f"latent 3 {6 * bound:+g}" in app.steering_summary(st)
    for bad in ("abc", float("nan"), 1e9):
        with pytest.raises(ValueError, match="latent 3"):
            app.set_value(st, 3, bad)
        assert st.steer[3] == 6 * bound


def test_conditional_steering_in_the_app_is_the_engines(app, engine):
    from sae.conditions import Condition

    st = SessionState()
    app.add_latent(st, 3, 40.0)
    assert "only where 5>0" in app.set_condition(st, "5>0") and "only where 5>0" in app.steering_summary(st)
    out = _drain(app.generate(st, "Hello", GREEDY))
    tokens = engine.encode_prompts(["Hello"])[0]
    assert out["steered"] == "Hello" + _as_the_app_runs_it(engine, tokens, [Edit(3, "add", 40.0,
                                                                                 when=Condition.parse("5>0"))])[1]
    with pytest.raises(ValueError, match="LATENT OP VALUE"):
        app.set_condition(st, "5 >> 0")
    with pytest.raises(ValueError, match="out of range"):
        app.set_condition(st, "500>0")
    assert str(st.when) == "5>0"  # a refused condition leaves the old one
    app.set_condition(st, "")
    assert st.when is None and st.edits() == [Edit(3, "add", 40.0)]


def test_contrast_in_the_app_is_the_commands(app, engine):
    from apps.contrast import run_contrast

    st = SessionState()
    a, b = "It rained all night.\nThe storm brought hail.", "The striker scored.\nThe keeper saved a penalty."
    summary, rows = app.contrast(st, a, b)
    ref = run_contrast(engine, a.splitlines(), b.splitlines())
    assert [r[0] for r in rows] == [r.latent for r in ref] == st.contrast_latents and "Welch" in summary
    summary, rows = app.contrast(st, a, "")
    assert "corpus baseline" in summary and rows
    with pytest.raises(ValueError, match="set A is empty"):
        app.contrast(st, "", b)


def test_geometry_in_the_app_matches_the_command(app, env, tmp_path):
    """The app's SAE against itself: every latent matched with itself, and the map drawn."""
    summary, image = app.geometry(str(env.sae), tmp_path)
    assert f"{app.engine.n_latents:,} matched, 0 in splits, 0 near, 0 novel" in summary
    if image is not None:
        assert (tmp_path / "geometry.png").stat().st_size > 0
    with pytest.raises(ValueError, match="another SAE"):
        app.geometry("", tmp_path)


def test_token_view_values_are_the_latents_activations(app, engine, env):
    """The shading of each token is the SAE's activation of the highlighted latent there, computed here
    position by position from the model's stored activations; steered rows have the edit on top."""
    import re

    import torch

    st = SessionState()
    app.add_latent(st, 5, 3.0)
    _drain(app.generate(st, "The delegates gathered at the", GREEDY))
    view = app.token_view(st, 5)
    values = [float(v) for v in re.findall(r'title="(-?[0-9.]+)"', view)]
    model, sae = engine.llm.model, engine.sae
    expected = []
    for seq, add in ((st.run.unsteered[0], 0.0), (st.run.steered[0], 3.0)):
        with torch.no_grad(), model.hooks([engine.site], None):
            acts = model.forward_activations(torch.tensor([seq]))[str(engine.site)][0]
        expected += [float(sae.encode(acts[t:t + 1].float())[0, 5]) + add for t in range(len(seq))]
    assert values == pytest.approx(expected, abs=2e-3)
    # Outlines: exactly the steered tokens that are not in the alignment with the unsteered output.
    from apps.web_app import changed_tokens

    assert changed_tokens([1, 2, 3, 4], [1, 9, 3, 4, 5]) == [False, True, False, False, True]


def test_an_abandoned_stream_frees_the_model(app, engine):
    """A page closed mid-generation leaves its generator suspended in the server; the model must still be
    released when that generation ends, not when (or if) the server drops the generator."""
    held = app.generate(SessionState(), "Hello", Sampling(0.0, 0.9, None, 30))
    next(held)  # the stream has started and holds the model
    assert engine.lock.acquire(timeout=60), "the abandoned stream kept the model"
    engine.lock.release()
    assert len(engine.complete(["Hi"], GREEDY)[0].tokens) == 8
    held.close()


def test_sessions_do_not_share_steering(app):
    a, b = SessionState(), SessionState()
    app.add_latent(a, 1)
    assert b.steer == {} and list(a.steer) == [1]
    assert app.slider_bound(a, 1) > 0 and b.ranges == {}
    assert a.steer[1] == pytest.approx(app.catalog.max_acts[1], abs=1e-3)


def test_chat_keeps_history_per_session(app, engine):
    st = SessionState()
    out = _drain(app.chat(st, "Hi", GREEDY))
    assert out["chat"][-1]["role"] == "assistant" and len(st.chat) == 2
    _drain(app.chat(st, "Again", GREEDY))
    assert [m["content"] for m in st.chat[::2]] == ["Hi", "Again"]
    ref = engine.stream([engine.encode_dialog(st.chat[:3])], GREEDY, top_latents=0)
    assert list(ref)[-1].completions[0].text == st.chat[3]["content"]


def test_ui_config_is_checked():
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        UiConfig(ckpt_dir="x", concurrency=0)
    with pytest.raises(ValueError, match="top_p"):
        UiConfig(ckpt_dir="x", top_p=1.5)
    assert UiConfig(ckpt_dir="x").host == "127.0.0.1" and not UiConfig(ckpt_dir="x").share


# --------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine, cfg):
    pytest.importorskip("gradio", reason="the web app needs gradio>=6 (pip install 'llama3-sae[web]')")
    from dataclasses import replace

    from apps.web import build_app, launch

    cfg = replace(cfg, port=_free_port())
    blocks = build_app(engine, cfg)
    launch(blocks, cfg, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{cfg.port}/"
    blocks.close()


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses (hex, as the kernel writes them) with a listening socket on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
                found.add(address)
    return found


def test_server_listens_on_loopback_only(server):
    from urllib.parse import urlparse

    port = urlparse(server).port
    addresses = _listening_addresses(port)
    if not addresses:
        pytest.skip("cannot read the listening sockets from /proc/net/tcp on this system")
    assert addresses == {"0100007F"}, addresses  # 127.0.0.1 only, not 0.0.0.0 (00000000)


def _as_the_app_runs_it(engine, tokens, edits):
    """(unsteered, steered) text of one prompt, as the app generates it: both rows in one batch."""
    from dataclasses import replace

    last = list(engine.stream([tokens, tokens], GREEDY, [replace(e, rows=(1,)) for e in edits], top_latents=0))[-1]
    return last.completions[0].text, last.completions[1].text


def test_two_concurrent_sessions_get_what_each_gets_alone(server, engine):
    from gradio_client import Client

    prompt = "The delegates gathered at the"
    rng = {latent: engine.catalog.slider_range(latent) for latent in (3, 7, 11)}
    settings = {"a": [(3, rng[3][1])], "b": [(7, rng[7][0]), (11, round(rng[11][1] / 2, 3))]}
    tokens = engine.encode_prompts([prompt])[0]
    alone = {name: _as_the_app_runs_it(engine, tokens, [Edit(lat, "add", v) for lat, v in edits])
             for name, edits in settings.items()}
    assert alone["a"][1] != alone["b"][1]
    clients = {name: Client(server, verbose=False, download_files=False) for name in settings}
    for name, edits in settings.items():
        for slot, (latent, value) in enumerate(edits):
            clients[name].predict(str(latent), api_name="/add_latent")
            clients[name].predict(value, api_name=f"/set_slider_{slot}")
    results: dict = {}

    def run(name):
        results[name] = clients[name].predict(prompt, 8, 0.0, 0.9, None, api_name="/generate")

    threads = [threading.Thread(target=run, args=(name,)) for name in settings]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for name in settings:
        unsteered_text, steered_text = results[name][0], results[name][1]
        assert (unsteered_text, steered_text) == (prompt + alone[name][0], prompt + alone[name][1]), name
    # Chat through the server uses the session's steering too, with the unsteered reply from the same batch.
    history, message_box, unsteered_reply, status = clients["b"].predict("Hi", 8, 0.0, 0.9, None, api_name="/chat")
    dialog = [{"role": "user", "content": "Hi"}]
    plain, reply = _as_the_app_runs_it(engine, engine.encode_dialog(dialog),
                                       [Edit(lat, "add", v) for lat, v in settings["b"]])
    assert [m["role"] for m in history] == ["user", "assistant"] and message_box == "" and status == "Done."
    content = history[1]["content"]
    text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    # (Gradio's chatbot and textbox show tabs as spaces.)
    assert text.split() == reply.split() and unsteered_reply.split() == plain.split() and plain != reply
    for c in clients.values():
        c.close()


# --------------------------------------------------------------------------- the page in a browser
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium); playwright's own download is not used")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, server):
    page = browser.new_context().new_page()
    page.goto(server)
    page.wait_for_selector("#prompts textarea", timeout=60_000)
    return page


def _add_by_search(page, engine, latent: int):
    from playwright.sync_api import expect

    word = engine.catalog.label(latent).split("'")[1]
    page.fill("#search textarea", word)
    page.click("#search-btn")
    expect(page.locator("#search-hits input")).not_to_have_value("", timeout=20_000)
    page.click("#search-hits input")
    page.get_by_role("option", name=f"{latent} · {engine.catalog.label(latent)}").click()


def test_the_page_steers_shows_pages_and_keeps_sessions_apart(server, browser, engine, env):
    from playwright.sync_api import expect

    from interpret import iter_examples

    prompt = "The delegates gathered at the"
    tokens = engine.encode_prompts([prompt])[0]
    page = _open(browser, server)
    expect(page.locator("body")).to_contain_text("local heuristic")  # where the labels come from
    # Search by label text, open the latent's page: its examples are the top examples on disk, in order.
    _add_by_search(page, engine, 3)
    page.click("#open-latent")
    expect(page.locator("#latent-page .latent-page")).to_have_attribute("data-latent", "3", timeout=20_000)
    (record,) = iter_examples(env.sae, [3])
    on_disk = [d for d, _ in record.top["max"]]
    shown = [int(x) for x in page.locator("#latent-page .example").evaluate_all(
        "els => els.map(e => e.dataset.doc)")][:len(on_disk)]
    assert on_disk and shown == on_disk
    expect(page.locator("#latent-page")).to_contain_text("promotes")
    # Steer it from the page; the slider spans +-4x its largest activation.
    page.click("#page-steer")
    expect(page.locator("#steering-summary")).to_contain_text("latent 3", timeout=20_000)
    slider = page.locator("#steer-slider-0")
    rng = slider.locator("input[type=range]")
    lo, hi = engine.catalog.slider_range(3)
    assert float(rng.get_attribute("max")) == pytest.approx(hi) and float(rng.get_attribute("min")) == pytest.approx(lo)
    expect(slider.locator("input[type=number]")).to_be_hidden()  # its clamping box is not offered
    # Type a value far outside the range: applied as typed, the slider widens to show it.
    far = round(3 * hi, 2)
    box = page.locator("#steer-value-0 input")
    box.fill(str(far))
    box.press("Enter")
    expect(page.locator("#steering-summary")).to_contain_text(f"latent 3 {far:+g}", timeout=20_000)
    assert float(rng.get_attribute("max")) == pytest.approx(far) and float(rng.input_value()) == pytest.approx(far)
    page.get_by_role("tab", name="Text").click()
    page.fill("#prompts textarea", prompt)
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    plain, steered = _as_the_app_runs_it(engine, tokens, [Edit(3, "add", far)])
    assert page.locator("#unsteered textarea").input_value() == prompt + plain
    assert page.locator("#steered textarea").input_value() == prompt + steered != prompt + plain
    expect(page.locator("#token-view .tokens")).to_have_count(2)
    # The slider with the keyboard, as a user moves it: its value box follows, and so does what is applied.
    rng.focus()
    page.keyboard.press("Home")
    expect(page.locator("#steering-summary")).to_contain_text(f"latent 3 {-far:+g}", timeout=20_000)
    expect(box).to_have_value(str(-far) if str(-far) != "-0.0" else "0", timeout=20_000)
    # Attribution: explain the first generated token; open the top latent's page, then steer it.
    page.get_by_text("Attribution: which latents").click()
    page.click("#attribute")
    expect(page.locator("#status")).to_contain_text("Attribution done", timeout=60_000)
    expect(page.locator("#attr-summary")).to_contain_text("activation x gradient")
    top_latent = int(page.locator("#attr-text-0").inner_text().split("·")[0].strip())
    page.click("#attr-open-0")
    expect(page.locator("#latent-page .latent-page")).to_have_attribute("data-latent", str(top_latent),
                                                                        timeout=20_000)
    # Two browser contexts with different steering at once: each gets what its own steering gives.
    page.get_by_role("tab", name="Text").click()
    page.click("#clear-steering")
    other = _open(browser, server)
    expect(other.locator("#steering-summary")).to_contain_text("No latents steered")
    settings = {page: (3, 6.0), other: (7, -6.0)}
    for pg, (latent, value) in settings.items():
        _add_by_search(pg, engine, latent)
        pg.click("#add-latent")
        pg.locator("#steer-value-0 input").fill(str(value))
        pg.locator("#steer-value-0 input").press("Enter")
        expect(pg.locator("#steering-summary")).to_contain_text(f"latent {latent} {value:+g}", timeout=20_000)
        pg.fill("#prompts textarea", prompt)
    for pg in settings:
        pg.click("#generate")
    for pg, (latent, value) in settings.items():
        expect(pg.locator("#status")).to_contain_text("Done", timeout=60_000)
        assert pg.locator("#steered textarea").input_value() == \
            prompt + _as_the_app_runs_it(engine, tokens, [Edit(latent, "add", value)])[1]
    # Empty input: a message, and the page keeps working.
    other.fill("#prompts textarea", "")
    other.click("#generate")
    expect(other.locator("#status")).to_contain_text("Type a prompt first", timeout=20_000)
    other.close()
    page.close()
