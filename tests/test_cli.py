"""The ``llama3-sae`` command line: dispatch, help, the tiny model, streaming completions, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from apps.cli import COMMANDS, main

pytest.importorskip("llama_models")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from apps.demo import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("cache"))


def test_tiny_checkpoint_is_cached_and_loadable(tiny_ckpt, tmp_path):
    from apps.demo import ensure_tiny_checkpoint
    from llama3 import Llama

    assert (tiny_ckpt / "params.json").is_file() and (tiny_ckpt / "tokenizer.model").is_file()
    before = (tiny_ckpt / "consolidated.00.pth").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tiny_ckpt.parent) == tiny_ckpt  # cached: not rewritten
    assert (tiny_ckpt / "consolidated.00.pth").stat().st_mtime_ns == before
    params = json.loads((tiny_ckpt / "params.json").read_text())
    assert params["vocab_size"] == 128256
    llm = Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=1, device="cpu", dtype=torch.float32)
    assert llm.tokenizer.n_words == 128256
    # Seeded weights: writing it again elsewhere gives the same model.
    again = ensure_tiny_checkpoint(tmp_path)
    a = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    b = torch.load(again / "consolidated.00.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_complete_streams_the_same_text_as_the_api(tiny_ckpt, capsys):
    from llama3 import Llama

    prompts = ["The delegates gathered at the", "Hello"]
    code = main(["complete", "--ckpt-dir", str(tiny_ckpt), "--temperature", "0", "--max-new-tokens", "6",
                 "--dtype", "fp32", "--device", "cpu", *prompts])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    llm = Llama.build(tiny_ckpt, max_seq_len=2048, max_batch_size=2, device="cpu", dtype=torch.float32)
    ref = llm.text_completion(prompts, temperature=0.0, max_gen_len=6)
    assert out == [f"[{i}] {p}{r.text}" for i, (p, r) in enumerate(zip(prompts, ref))]


def test_complete_single_prompt_streams_plain_text(tiny_ckpt, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Once upon a time\n\n")
    proc = subprocess.run([sys.executable, "-m", "apps", "complete", "--ckpt-dir", str(tiny_ckpt),
                           "--prompts-file", str(prompts_file), "--temperature", "0.7", "--seed", "1",
                           "--max-new-tokens", "5", "--dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time") and len(proc.stdout) > len("Once upon a time\n")


def test_demo_runs(tiny_ckpt, capsys):
    assert main(["demo", "--cache-dir", str(tiny_ckpt.parent), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "[0] The delegates gathered at the" in out and "[1] Senior diplomats met to discuss" in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: llama3-sae " + name in capsys.readouterr().out


def test_top_level_help_and_unknown_command(capsys):
    assert main([]) == 0
    assert "commands:" in capsys.readouterr().out
    assert main(["compelte"]) == 2
    assert "Did you mean 'complete'" in capsys.readouterr().err


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["complete", "--ckpt-dir", str(tmp_path), "hi"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "params.json" in err and "Traceback" not in err


def test_bad_option_values_are_rejected(tiny_ckpt, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["complete", "--ckpt-dir", str(tiny_ckpt), "--top-p", "0", "hi"])
    assert exc.value.code == 2
    assert "top_p" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no prompts"):
        main(["complete", "--ckpt-dir", str(tiny_ckpt)])
