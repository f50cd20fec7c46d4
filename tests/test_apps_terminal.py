"""``llama3-sae complete`` and ``llama3-sae chat`` as a user sees them: in a pseudo-terminal (live view,
latent panel, interactive chat), through a pipe (plain text), and with bad input."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("llama_models")

from apps_support import N_LATENTS, build_env, strip_ansi, subprocess_env  # noqa: E402

from apps.cli import main  # noqa: E402
from apps.engine import Engine, ModelOptions, Sampling  # noqa: E402
from sae import Edit  # noqa: E402
from sae.conditions import Condition  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The delegates gathered at the", "Hello"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.getbasetemp() / "apps-env")


@pytest.fixture(scope="module")
def engine(env):
    return Engine.load(ModelOptions(ckpt_dir=env.ckpt, max_seq_len=2048, device="cpu", model_dtype="fp32"), env.sae,
                       max_batch_size=2)


def _common(env, *extra):
    return ["--ckpt-dir", str(env.ckpt), "--model-dtype", "fp32", "--device", "cpu", "--sae", str(env.sae), *extra]


def test_piped_output_is_plain_and_steered_as_the_api_says(env, engine, capsys):
    code = main(["complete", *_common(env, "--temperature", "0", "--max-new-tokens", "6"), *PROMPTS,
                 "--steer", "3=40"])
    assert code == 0
    captured = capsys.readouterr()
    ref = engine.complete(PROMPTS, Sampling(0.0, 0.9, None, 6), [Edit(3, "add", 40.0)])
    assert captured.out.splitlines() == [f"[{i}] {p}{c.text}" for i, (p, c) in enumerate(zip(PROMPTS, ref), 1)]
    assert "\x1b[" not in captured.out  # no terminal codes in a pipe
    assert "steering: latent 3 +40" in captured.err


def test_edits_may_come_before_between_or_after_the_prompts(env, engine, capsys):
    """--steer takes one edit per flag, so a prompt after it is a prompt; the old --dtype still works, warns."""
    args = ["--ckpt-dir", str(env.ckpt), "--dtype", "fp32", "--device", "cpu", "--sae", str(env.sae),
            "--temperature", "0", "--max-new-tokens", "6"]
    assert main(["complete", *args, "--steer", "3=40", PROMPTS[0], "--steer", "5=-2", PROMPTS[1]]) == 0
    captured = capsys.readouterr()
    ref = engine.complete(PROMPTS, Sampling(0.0, 0.9, None, 6), [Edit(3, "add", 40.0), Edit(5, "add", -2.0)])
    assert captured.out.splitlines() == [f"[{i}] {p}{c.text}" for i, (p, c) in enumerate(zip(PROMPTS, ref), 1)]
    assert "--dtype is deprecated" in captured.err and "use --model-dtype" in captured.err
    # --steer-when: the same edits, only where latent 5 fires.
    assert main(["complete", *args, *PROMPTS, "--steer", "3=40", "--steer-when", "5>0"]) == 0
    when = Condition.parse("5>0")
    ref = engine.complete(PROMPTS, Sampling(0.0, 0.9, None, 6), [Edit(3, "add", 40.0, when=when)])
    assert capsys.readouterr().out.splitlines() == [f"[{i}] {p}{c.text}" for i, (p, c) in
                                                    enumerate(zip(PROMPTS, ref), 1)]


def test_prompts_from_stdin_one_per_line(env, engine, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("The delegates gathered at the\n\nHello\n"))
    assert main(["complete", *_common(env, "--temperature", "0", "--max-new-tokens", "4", "--prompts-file", "-")]) == 0
    ref = engine.complete(PROMPTS, Sampling(0.0, 0.9, None, 4))
    assert capsys.readouterr().out.splitlines() == [f"[{i}] {p}{c.text}" for i, (p, c) in enumerate(zip(PROMPTS, ref), 1)]


def test_complete_in_a_terminal_streams_with_a_latent_panel(env, engine):
    pexpect = pytest.importorskip("pexpect")
    prompt = "The delegates gathered at the"
    args = ["-m", "apps", "complete", *_common(env, "--temperature", "0", "--max-new-tokens", "12", "--fps", "1000",
                                                "--latents", "4"), prompt, "--steer", "3=40"]
    child = pexpect.spawn(sys.executable, args, env=subprocess_env(), encoding="utf-8", dimensions=(60, 160),
                          timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    screen = strip_ansi(child.before)
    expected = engine.complete([prompt], Sampling(0.0, 0.9, None, 12), [Edit(3, "add", 40.0)])[0].text
    # Streamed: the text was drawn several times, growing, before the final frame.
    frames = [line for line in screen.splitlines() if prompt in line]
    grown = [f.split(prompt, 1)[1].split("│")[0].rstrip().rstrip("▌") for f in frames]
    assert len(set(grown)) >= 4, frames
    assert all(expected.startswith(g.strip()) or expected.strip().startswith(g.strip()) for g in grown if g.strip())
    assert expected.strip() in screen.replace("\n", "")
    # The latent panel: title, the steered latent marked, labels from latents.jsonl, the steering line.
    assert "top latents · latest token" in screen
    assert "◆ steered" in screen and "fires on" in screen
    assert "steering: latent 3 +40" in screen


def test_chat_in_a_terminal_keeps_history_and_steers(env, engine):
    pexpect = pytest.importorskip("pexpect")
    args = ["-m", "apps", "chat", *_common(env, "--temperature", "0", "--max-new-tokens", "6", "--latents", "3")]
    child = pexpect.spawn(sys.executable, args, env=subprocess_env(), encoding="utf-8", dimensions=(60, 160),
                          timeout=120)
    try:
        child.expect("you>")
        assert "local heuristic" in strip_ansi(child.before)  # says where the labels come from
        child.sendline("Hi there")
        child.expect("you>")
        first = strip_ansi(child.before)
        sampling = Sampling(0.0, 0.9, None, 6)
        reply = _chat(engine, [{"role": "user", "content": "Hi there"}], sampling)
        assert "assistant: " in first and reply.strip() in first.replace("\n", "")
        assert "top latents · latest token" in first
        # The second turn sees the first (history), here with steering on.
        child.sendline("/steer 3=40")
        child.expect("you>")
        assert "steering: latent 3 +40" in strip_ansi(child.before)
        child.sendline("More")
        child.expect("you>")
        second = strip_ansi(child.before)
        dialog = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": reply},
                  {"role": "user", "content": "More"}]
        reply2 = _chat(engine, dialog, sampling, [Edit(3, "add", 40.0)])
        assert reply2.strip() in second.replace("\n", "") and "◆ steered" in second
        child.sendline("/steer 999=1")
        child.expect("you>")
        assert "latent 999 is out of range" in strip_ansi(child.before)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def _chat(engine, dialog, sampling, edits=()):
    steps = list(engine.stream([engine.encode_dialog(dialog)], sampling, edits, top_latents=0))
    return steps[-1].completions[0].text


def test_chat_without_a_terminal_reads_lines(env, engine, capsys):
    from apps.chat import ChatConfig, run_chat
    from apps.terminal import make_console

    sampling = Sampling(0.0, 0.9, None, 5)
    hi = [{"role": "user", "content": "Hi there"}]
    reply, steered = _chat(engine, hi, sampling), _chat(engine, hi, sampling, [Edit(3, "add", 40.0)])
    # A condition that holds at some tokens only: its reply differs from both.
    for latent in range(N_LATENTS):
        when = Condition.parse(f"{latent}>0")
        conditional = _chat(engine, hi, sampling, [Edit(3, "add", 40.0, when=when)])
        if conditional not in (reply, steered):
            break
    else:
        pytest.fail("no latent of the test SAE gates the edit at some tokens only")
    lines = iter(["Hi there", "/reset", "Hi there", "/steer 3=40", "Hi there", "/unsteer", "/bogus", "/reset",
                  f"/steer 3=40 when {latent}>0", "Hi there", "/quit"])
    cfg = ChatConfig(ckpt_dir=env.ckpt, sae=env.sae, device="cpu", model_dtype="fp32", temperature=0.0, max_new_tokens=5)
    assert run_chat(cfg, console=make_console(), read=lambda prompt: next(lines)) == 0
    out = capsys.readouterr().out
    assert reply != steered
    # /reset: the second answer does not see the first, so it is the same; then one steered answer.
    assert out.count("assistant: ") == 4 and out.count(f"assistant: {reply}\n") == 2
    assert f"assistant: {steered}\n" in out and out.rstrip().endswith(f"assistant: {conditional}")
    assert f"where {latent}>0" in out
    assert "conversation cleared" in out and "steering: off" in out and "unknown command '/bogus'" in out


@pytest.mark.parametrize("extra, message", [
    (["--steer", "64=1", "--", "hi"], "latent 64 is out of range: this SAE has latents 0..63"),
    (["--max-seq-len", "16", "word " * 40], "leaves no room to generate within the context of 16 tokens"),
])
def test_bad_input_is_a_clear_error(env, capsys, extra, message):
    code = main(["complete", *_common(env), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_malformed_edit_is_a_clear_error(env, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["complete", *_common(env), "--steer", "hi", "a prompt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--steer 'hi': cannot parse steering edit" in err and "LATENT=VALUE" in err


def test_an_sae_that_does_not_fit_is_a_clear_error(env, tmp_path, capsys):
    from sae import SAEConfig, SparseAutoencoder

    SparseAutoencoder(SAEConfig(d_model=32, n_latents=8, k=2, site="L1R"), seed=0).save(tmp_path / "sae")
    code = main(["complete", "--ckpt-dir", str(env.ckpt), "--sae", str(tmp_path / "sae"), "hi"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "d_model=32" in err
    with pytest.raises(SystemExit):  # --steer without --sae: refused while parsing
        main(["complete", "--ckpt-dir", str(env.ckpt), "hi", "--steer", "1=2"])
    assert "--steer needs an SAE" in capsys.readouterr().err


def test_model_state_is_clean_after_a_failed_call(engine):
    # A too-long prompt fails before the model is touched; the engine keeps working.
    with pytest.raises(ValueError):
        list(engine.stream([[1] * 5000], Sampling(0.0, 0.9, None, 2)))
    out = engine.complete(["Hello"], Sampling(0.0, 0.9, None, 3))
    assert len(out[0].tokens) == 3
    assert engine.llm.model.sae_fns == {} and torch.is_grad_enabled()
