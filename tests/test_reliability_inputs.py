"""Bad input refused where it enters (issue 12): non-finite steering, repeated flags, incomplete configs."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest
import torch

from llama3_sae.config import add_dataclass_args, from_namespace
from sae import Edit


@pytest.mark.parametrize("spec", ["5=nan", "5=inf", "5=-inf", "5=1e400", "5:set=1e39", "5:clamp=0..inf",
                                  "5:clamp=-1e30..1", "5:add=20001"])
def test_non_finite_or_overflowing_edits_are_refused(spec):
    with pytest.raises(ValueError, match="must be a finite number within"):
        Edit.parse(spec)


def test_edits_within_range_still_parse():
    assert Edit.parse("5=20").value == 20 and Edit.parse("5:clamp=..8").max == 8
    with pytest.raises(ValueError, match="finite"):
        Edit(3, "add", float("nan"))  # the web app and chat build Edits directly


def test_chat_steer_command_refuses_non_finite():
    from apps.engine import parse_steer

    with pytest.raises(ValueError, match="finite"):
        parse_steer("7=nan")


def test_complete_refuses_non_finite_steering_before_loading(capsys):
    from apps.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["complete", "--sae", "/nonexistent", "hi", "--steer", "5=nan"])
    assert exc.value.code == 2 and "finite" in capsys.readouterr().err


@dataclass
class _Opts:
    steer: list[str] = field(default_factory=list)
    """Edits."""


def test_repeated_list_flags_accumulate():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, _Opts)
    cfg = from_namespace(_Opts, parser.parse_args(["--steer", "1=3", "--steer", "2=4", "5=1"]))
    assert cfg.steer == ["1=3", "2=4", "5=1"]


def test_params_json_without_a_shape_key_names_it(tmp_path):
    from llama3.args import ModelArgs

    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "vocab_size": 300}))
    with pytest.raises(ValueError, match="has no n_heads"):
        ModelArgs.from_params_json(path)


def test_sae_config_that_is_not_json_is_reported_as_damaged(tmp_path):
    from sae import SAEConfig, SparseAutoencoder, load_sae

    SparseAutoencoder(SAEConfig(d_model=8, n_latents=16, k=2)).save(tmp_path / "sae")
    (tmp_path / "sae" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON.*damaged"):
        load_sae(tmp_path / "sae")


def test_zero_documents_is_an_error_naming_the_fields_found(tmp_path):
    from capture.config import SourceConfig
    from capture.sources import iter_documents

    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "a sentence", "id": 1}\n{"body": "another", "id": 2}\n')
    with pytest.raises(ValueError, match=r"no documents \(2 records read, 2 malformed\).*hold \['body', 'id'\]: "
                                         r"pass --text-field KEY"):
        list(iter_documents(SourceConfig(data=(data,))))
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="no documents"):
        list(iter_documents(SourceConfig(data=(empty,))))
    assert [d.text for d in iter_documents(SourceConfig(data=(data,), text_field="body"))] == ["a sentence", "another"]


def test_identical_shards_are_identical_bytes_across_processes(tmp_path):
    """safetensors' own writer orders metadata through a hash map; ours is fixed, so stores compare by hash."""
    import subprocess
    import sys

    script = ("import sys, torch; from capture.store import write_shard; "
              "print(write_shard(sys.argv[1], torch.arange(12.).view(3, 4), torch.zeros(3, dtype=torch.int32), "
              "torch.zeros(3, dtype=torch.int64), torch.arange(3, dtype=torch.int32), site='L0R')['sha256'])")
    shas = {subprocess.run([sys.executable, "-c", script, str(tmp_path / f"s{i}.safetensors")], capture_output=True,
                           text=True, check=True).stdout.strip() for i in range(5)}
    assert len(shas) == 1
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "s0.safetensors"))
    assert t["activations"].tolist() == torch.arange(12.).view(3, 4).tolist()


def test_sae_files_follow_the_umask(tmp_path):
    import os
    import stat

    from sae import SAEConfig, SparseAutoencoder, load_sae

    old = os.umask(0o022)
    try:
        sae = SparseAutoencoder(SAEConfig(d_model=8, n_latents=16, k=2))
        sae.save(tmp_path / "sae")
    finally:
        os.umask(old)
    for name in ("sae.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "sae" / name).stat().st_mode) == 0o644
    again = load_sae(tmp_path / "sae")
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), again.state_dict().values()))


def test_interpret_heuristic_refuses_a_damaged_sae_config(tmp_path):
    from interpret.config import InterpretConfig
    from interpret.labels import run_interpret
    from interpret.records import EXAMPLES_FILE, EXAMPLES_FORMAT, EXAMPLES_META, LatentExamples

    sae = tmp_path / "sae"
    sae.mkdir()
    rec = LatentExamples(0, {"docs": 1, "tokens": 2, "active_docs": 0, "active_tokens": 0, "max": 0.0, "sum": 0.0},
                         {"max": [], "mean": [], "last": []}, [], [], [])
    (sae / EXAMPLES_FILE).write_text(json.dumps(rec.to_json()) + "\n")
    (sae / EXAMPLES_META).write_text(json.dumps({"format": EXAMPLES_FORMAT, "version": 1, "complete": True,
                                                 "n_latents": 1}))
    (sae / "sae.safetensors").write_bytes(b"")
    (sae / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        run_interpret(InterpretConfig(sae=sae, heuristic=True, progress=False))
