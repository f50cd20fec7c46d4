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
from apps.web import SessionState, UiConfig, WebApp, parse_prompts  # noqa: E402
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
    return UiConfig(ckpt_dir=env.ckpt, sae=env.sae, device="cpu", dtype="fp32", max_seq_len=128, max_batch=2,
                    concurrency=2, max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def engine(env, cfg):
    return Engine.load(cfg, cfg.sae, max_batch_size=cfg.max_batch)


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


def test_generate_compares_steered_and_unsteered_and_reuses_the_unsteered(app, engine):
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

    def counting(*a, **kw):
        calls.append(a[2] if len(a) > 2 else kw.get("edits", ()))
        return real_stream(*a, **kw)

    engine.stream = counting
    try:
        out = _drain(app.generate(st, "\n".join(prompts), GREEDY))
    finally:
        del engine.stream
    assert len(calls) == 1 and list(calls[0]) == [Edit(3, "add", 40.0)]  # the unsteered side was reused
    steered = engine.complete(prompts, GREEDY, [Edit(3, "add", 40.0)])
    assert out["steered"] == "\n\n".join(f"[{i + 1}] {p}{c.text}" for i, (p, c) in enumerate(zip(prompts, steered)))
    assert out["steered"] != out["unsteered"]
    # The latents table lists the steered latent, marked; attribution choices are the generated tokens.
    assert any(row[1] == 3 and "◆ steered" in row[3] for row in out["latents"])
    assert len(out["tokens"]) == len(steered[0].tokens)
    summary, rows = app.attribute(st, out["tokens"][0][1], 4)
    assert "logit - mean logit" in summary and len(rows) == 4 and st.attr_latents == [r[0] for r in rows]
    # Slots: set, remove.
    app.set_slot(st, 0, -5.0)
    assert st.steer == {3: -5.0}
    app.remove_slot(st, 0)
    assert st.steer == {} and st.edits() == []


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
    lo, hi = app.slider_range(1)
    assert lo < 0 < hi and a.steer[1] == pytest.approx(app.catalog.max_acts[1], abs=1e-3)


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


def test_two_concurrent_sessions_get_what_each_gets_alone(server, engine):
    from gradio_client import Client

    prompt = "The delegates gathered at the"
    rng = {latent: engine.catalog.slider_range(latent) for latent in (3, 7, 11)}
    settings = {"a": [(3, rng[3][1])], "b": [(7, rng[7][0]), (11, round(rng[11][1] / 2, 3))]}
    alone = {name: engine.complete([prompt], GREEDY, [Edit(lat, "add", v) for lat, v in edits])[0].text
             for name, edits in settings.items()}
    assert alone["a"] != alone["b"]
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
        assert steered_text == prompt + alone[name], name
        assert unsteered_text == prompt + engine.complete([prompt], GREEDY)[0].text
    # Chat through the server uses the session's steering too.
    history, message_box, status = clients["b"].predict("Hi", 8, 0.0, 0.9, None, api_name="/chat")
    dialog = [{"role": "user", "content": "Hi"}]
    steps = engine.stream([engine.encode_dialog(dialog)], GREEDY, [Edit(lat, "add", v) for lat, v in settings["b"]])
    reply = list(steps)[-1].completions[0].text
    assert [m["role"] for m in history] == ["user", "assistant"] and message_box == "" and status == "Done."
    content = history[1]["content"]
    text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    assert text.strip() == reply.strip()
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


def test_the_page_steers_with_a_slider(server, browser, engine):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(server)
    page.wait_for_selector("#prompts textarea", timeout=60_000)
    expect(page.locator("body")).to_contain_text("local heuristic")  # where the labels come from
    prompt = "The delegates gathered at the"
    page.fill("#prompts textarea", prompt)
    # Search by label text: a word of latent 3's heuristic label finds it; add it as a slider.
    word = engine.catalog.label(3).split("'")[1]
    page.fill("#search textarea", word)
    page.click("#search-btn")
    expect(page.locator("#search-hits input")).not_to_have_value("", timeout=20_000)
    hits = [h.latent for h in engine.catalog.search(word)]
    page.click("#search-hits input")
    page.get_by_role("option", name=f"3 · {engine.catalog.label(3)}").click()
    page.click("#add-latent")
    expect(page.locator("#steering-summary")).to_contain_text("latent 3", timeout=20_000)
    assert 3 in hits
    slider = page.locator("#steer-slider-0")
    expect(slider).to_be_visible()
    lo, hi = engine.catalog.slider_range(3)
    rng = slider.locator("input[type=range]")
    assert float(rng.get_attribute("max")) == pytest.approx(hi) and float(rng.get_attribute("min")) == pytest.approx(lo)
    number = slider.locator("input[type=number]")
    # Move the slider to its top with the keyboard, as a user would, then generate.
    rng.focus()
    page.keyboard.press("End")
    expect(page.locator("#steering-summary")).to_contain_text("latent 3 +", timeout=20_000)
    top = float(number.input_value())
    assert top == pytest.approx(hi, rel=0.02)
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    unsteered = page.locator("#unsteered textarea").input_value()
    steered = page.locator("#steered textarea").input_value()
    assert unsteered == prompt + engine.complete([prompt], GREEDY)[0].text
    assert steered == prompt + engine.complete([prompt], GREEDY, [Edit(3, "add", top)])[0].text
    assert steered != unsteered
    # Move it to the bottom: the steered text changes again, the unsteered one does not.
    rng.focus()
    page.keyboard.press("Home")
    expect(page.locator("#steering-summary")).to_contain_text("latent 3 -", timeout=20_000)
    bottom = float(number.input_value())
    page.click("#generate")
    expect(page.locator("#steered textarea")).not_to_have_value(steered, timeout=60_000)
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    assert page.locator("#steered textarea").input_value() == \
        prompt + engine.complete([prompt], GREEDY, [Edit(3, "add", bottom)])[0].text
    assert page.locator("#unsteered textarea").input_value() == unsteered
    # Attribution: explain the first generated token; steer its top latent with one click.
    page.get_by_text("Attribution: which latents").click()
    page.click("#attribute")
    expect(page.locator("#status")).to_contain_text("Attribution done", timeout=60_000)
    expect(page.locator("#attr-summary")).to_contain_text("logit - mean logit")
    top_text = page.locator("#attr-text-0").inner_text()
    page.click("#attr-steer-0")
    top_latent = int(top_text.split("·")[0].strip())
    expect(page.locator("#steering-summary")).to_contain_text(f"latent {top_latent}", timeout=20_000)
    # A second browser session starts with no steering: sessions do not share state.
    other = browser.new_context().new_page()
    other.goto(server)
    other.wait_for_selector("#prompts textarea", timeout=60_000)
    expect(other.locator("#steering-summary")).to_contain_text("No latents steered")
    expect(other.locator("#steer-slider-0")).to_be_hidden()
    # Empty input: a message, and the page keeps working.
    other.click("#generate")
    expect(other.locator("#status")).to_contain_text("Type a prompt first", timeout=20_000)
    other.close()
    page.close()
