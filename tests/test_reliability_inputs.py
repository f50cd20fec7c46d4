"""Bad input refused where it enters (issue 12): non-finite steering, repeated flags, incomplete configs."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from apps.config import add_dataclass_args, from_namespace
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
