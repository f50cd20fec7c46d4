"""Training never turns a damaged store into an SAE (issue 12): flipped bytes, truncation, non-finite rows."""

from __future__ import annotations

import json
import re

import pytest

from training.cli import main_train
from training.synthetic import sparse_dictionary_data, write_store


def _store(path, values=None):
    x, _ = sparse_dictionary_data(1200, 16, 24, 3, noise=0.02, seed=2)
    if values is not None:
        x[values] = float("inf")
    return write_store(path, x, shard_rows=400)


def _train(store, out):
    return main_train(["--store", str(store), "--out", str(out), "--n-latents", "32", "--k", "4", "--batch-size", "64",
                       "--steps", "20", "--warmup-steps", "2", "--no-progress", "--val-fraction", "0.05"])


def test_flipped_bytes_are_found_by_name_before_training(tmp_path, capsys):
    store = _store(tmp_path / "L0R")
    shard = store / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # one activation byte
    shard.write_bytes(bytes(data))
    assert _train(store, tmp_path / "sae") == 2
    assert re.search(r"shard-000001.safetensors: sha256 .* does not match the manifest", capsys.readouterr().err)
    assert not (tmp_path / "sae" / "sae.safetensors").exists()


def test_verification_is_recorded_and_not_repeated(tmp_path, monkeypatch):
    store = _store(tmp_path / "L0R")
    assert _train(store, tmp_path / "a") == 0
    record = json.loads((store / "verified.json").read_text())
    assert sorted(record) == ["shard-000000.safetensors", "shard-000001.safetensors", "shard-000002.safetensors"]
    import llama3_sae.files as files

    def no_hashing(path, **kw):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(files, "sha256_file", no_hashing)
    assert _train(store, tmp_path / "b") == 0


def test_a_truncated_shard_is_named(tmp_path, capsys):
    store = _store(tmp_path / "L0R")
    shard = store / "shard-000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-500])
    assert _train(store, tmp_path / "sae") == 2
    assert "shard-000002.safetensors is truncated" in capsys.readouterr().err


def test_non_finite_activations_stop_training_without_saving(tmp_path, capsys):
    store = _store(tmp_path / "L0R", values=slice(500, 520))  # sha256 matches: written this way
    assert _train(store, tmp_path / "sae") == 2
    assert "became non-finite at step" in capsys.readouterr().err
    assert not (tmp_path / "sae" / "sae.safetensors").exists()
    assert not list((tmp_path / "sae").glob("checkpoints/step-*"))


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes(tmp_path):
    """A file-size limit stands in for a full disk (writes fail with EFBIG, as with ENOSPC): one line, no
    traceback, and the same command finishes once the space is there."""
    import resource
    import signal
    import subprocess
    import sys

    store = _store(tmp_path / "L0R")
    out = tmp_path / "sae"
    cmd = [sys.executable, "-m", "training", "--store", str(store), "--out", str(out), "--n-latents", "32", "--k", "4",
           "--batch-size", "64", "--steps", "20", "--warmup-steps", "2", "--no-progress", "--val-fraction", "0.05",
           "--checkpoint-every", "10"]

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    full = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert full.returncode == 2, full.stderr
    err = full.stderr.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in full.stderr
    assert "cannot write" in err[-1] and str(out) in err[-1] and "rerun the same command" in err[-1]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (out / "sae.safetensors").is_file()


def test_a_schedule_that_does_not_fit_the_run_is_warned_about(tmp_path, capsys):
    store = _store(tmp_path / "L0R")
    assert main_train(["--store", str(store), "--out", str(tmp_path / "sae"), "--n-latents", "32", "--k", "4",
                       "--batch-size", "64", "--steps", "10", "--no-progress", "--val-fraction", "0.05"]) == 0
    err = capsys.readouterr().err
    assert "the warm-up (1,000 steps) takes 100% of this 10-step run" in err
    assert "--dead-after-tokens 10,000,000 is more than the 640 rows" in err
    assert main_train(["--store", str(store), "--out", str(tmp_path / "sae2"), "--n-latents", "32", "--k", "4",
                       "--batch-size", "64", "--steps", "10", "--warmup-steps", "2", "--dead-after-tokens", "100",
                       "--no-progress", "--val-fraction", "0.05"]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_resume_refuses_a_store_rewritten_at_the_same_path(tmp_path, capsys):
    store = _store(tmp_path / "L0R")
    out = tmp_path / "sae"
    argv = ["--store", str(store), "--out", str(out), "--n-latents", "32", "--k", "4", "--batch-size", "64",
            "--steps", "40", "--warmup-steps", "2", "--no-progress", "--val-fraction", "0.05",
            "--checkpoint-every", "10"]
    import training.loop as loop

    real = loop.Trainer.save_checkpoint
    calls = {"n": 0}

    def stop_after_first(self):
        real(self)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    loop.Trainer.save_checkpoint = stop_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            main_train(argv)
    finally:
        loop.Trainer.save_checkpoint = real
    import shutil

    shutil.rmtree(store)
    x, _ = sparse_dictionary_data(1200, 16, 24, 3, noise=0.02, seed=99)  # other data, same shape and path
    write_store(store, x, shard_rows=400)
    assert main_train(argv) == 2
    assert "was trained on other data: the store at" in capsys.readouterr().err


def test_dead_latents_are_reported_over_the_training_rows(tmp_path, capsys):
    """Not from the held-out split (60 rows here, far too few to call a latent dead)."""
    store = _store(tmp_path / "L0R")
    assert _train(store, tmp_path / "sae") == 0
    err = capsys.readouterr().err
    m = re.search(r"dead (\d+\.\d+)% \(no activation in the last ([\d,]+) training rows\)", err)
    assert m and m.group(2) == f"{20 * 64:,}"  # the whole run: it is shorter than --dead-after-tokens
