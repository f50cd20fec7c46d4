"""The typed training config: the original project's defaults, --help from the field docstrings, config
files equal to the saved run config, and clear errors for bad options."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llama3_sae.config import field_docs, save_config
from llama3_sae.config import parse_config
from training.cli import main_eval, main_train
from training.config import TrainConfig
from training.eval import EvalConfig


def test_defaults_are_the_original_projects():
    cfg = TrainConfig(store="s", out="o")
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.lr_final_ratio) == (5e-5, (0.85, 0.9999), 6.25e-10, 0.2)
    assert (cfg.batch_size, cfg.k, cfg.k_aux, cfg.aux_coeff) == (1024, 64, 2048, 1 / 32)
    assert cfg.warmup_steps > 0 and cfg.grad_clip > 0 and cfg.dead_after_tokens == 10_000_000
    assert cfg.ema_decay is None and cfg.bf16 is False and cfg.model_parallel == 1


def test_every_field_has_a_docstring_and_help_shows_it(capsys):
    docs = field_docs(TrainConfig)
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not docs.get(f.name)]
    assert not missing
    assert not [f.name for f in dataclasses.fields(EvalConfig) if not field_docs(EvalConfig).get(f.name)]
    with pytest.raises(SystemExit) as e:
        main_train(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in ("--store", "--n-latents", "--k-anneal-start", "--model-parallel", "--ema-decay", "--no-bf16"):
        assert f in text
    assert "Peak learning rate of AdamW. (default: 5e-05)" in text
    with pytest.raises(SystemExit):
        main_eval(["--help"])
    assert "--ckpt-dir" in capsys.readouterr().out


def test_config_file_round_trip_and_command_line_override(tmp_path):
    cfg = parse_config(TrainConfig, ["--store", "st", "--out", "o1", "--k", "16", "--betas", "0.9", "0.99",
                                     "--k-anneal-start", "64", "--k-anneal-steps", "100"], "t", "")
    path = tmp_path / "train_config.json"
    save_config(cfg, path)
    again = parse_config(TrainConfig, ["--config", str(path)], "t", "")
    assert again == cfg and isinstance(again.betas, tuple)
    other = parse_config(TrainConfig, ["--config", str(path), "--out", "o2", "--lr", "1e-3"], "t", "")
    assert (other.out.name, other.lr, other.k) == ("o2", 1e-3, 16)
    raw = json.loads(path.read_text())
    raw["not_an_option"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(path)], "t", "")


def test_bad_options_are_reported_together():
    with pytest.raises(ValueError) as e:
        TrainConfig(store="s", out="o", k=0, lr=-1.0, betas=(0.9, 1.5), n_latents=100, model_parallel=3)
    msg = str(e.value)
    for part in ("--k must be > 0", "--lr must be > 0", "--betas", "divisible by --model-parallel 3"):
        assert part in msg
    with pytest.raises(ValueError, match="--bf16 trains with data parallelism only"):
        TrainConfig(store="s", out="o", n_latents=128, model_parallel=2, bf16=True)
    with pytest.raises(ValueError, match="--k-anneal-steps needs --k-anneal-start"):
        TrainConfig(store="s", out="o", k_anneal_steps=10)
    with pytest.raises(ValueError, match="cannot be combined"):
        TrainConfig(store="s", out="o", overwrite=True)


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    rc = main_train(["--store", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not an activation store" in err and "llama3-sae train: error" in err


def test_identity_ignores_options_that_do_not_change_the_weights():
    a = TrainConfig(store="s", out="o")
    b = TrainConfig(store="s", out="other", log_every=3, progress=False, checkpoint_every=7, device="cpu")
    c = TrainConfig(store="s", out="o", lr=1e-4)
    assert a.identity() == b.identity() and a.identity() != c.identity()
