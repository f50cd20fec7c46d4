"""Training never turns a damaged store into an SAE (issue 12): flipped bytes, truncation, non-finite rows."""

from __future__ import annotations

import json
import re

import pytest
import torch

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
    import training.data as data

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(data, "sha256_file", no_hashing)
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
