"""``llama3-sae inspect-sae``: the report says what the loader understood, and --store measures the same L0 and
explained variance as encoding the rows directly."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from apps.cli import main
from sae import load_sae
from training.synthetic import write_store

D, L = 16, 48


def rand(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def llama_scope_release(path, threshold=0.4):
    (path / "checkpoints").mkdir(parents=True)
    hp = {"d_model": D, "d_sae": L, "act_fn": "jumprelu", "jump_relu_threshold": threshold, "top_k": 50,
          "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": 20.0, "out": 20.0},
          "apply_decoder_bias_to_pre_encoder": False, "sparsity_include_decoder_norm": True,
          "hook_point_in": "blocks.7.hook_resid_post", "hook_point_out": "blocks.7.hook_resid_post"}
    (path / "hyperparams.json").write_text(json.dumps(hp))
    (path / "lm_config.json").write_text(json.dumps({"model_name": "meta-llama/Llama-3.1-8B"}))
    save_file({"encoder.weight": rand(L, D, seed=1, scale=0.5), "encoder.bias": rand(L, seed=2, scale=0.1),
               "decoder.weight": rand(D, L, seed=3, scale=0.3), "decoder.bias": rand(D, seed=4, scale=0.1)},
              path / "checkpoints" / "final.safetensors")
    return path


def test_inspect_reports_what_the_loader_understood(tmp_path, capsys):
    path = llama_scope_release(tmp_path / "L7R-3x")
    assert main(["inspect-sae", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout         llama_scope" in out
    assert "computes as    jumprelu; 48 latents over d_model=16" in out
    assert "L7R: the residual stream leaving block 7" in out
    assert "meta-llama/Llama-3.1-8B" in out
    assert f"in {math.sqrt(D) / 20:.4g}" in out and "folded into the weights" in out
    assert "raw activation units" in out  # where lm-saes 1.x compares its threshold, and the code scale
    assert main(["inspect-sae", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["path"] == str(path) and r["site"] == "L7R" and r["threshold"]["min"] == r["threshold"]["max"] == pytest.approx(0.4)


def test_inspect_store_measures_l0_and_explained_variance(tmp_path, capsys):
    path = llama_scope_release(tmp_path / "sae")
    x = rand(3000, D, seed=9) * 5 + rand(D, seed=10)
    write_store(tmp_path / "store", x, shard_rows=1000, site="L7R")
    assert main(["inspect-sae", str(path), "--store", str(tmp_path / "store"), "--max-rows", "2500", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["measured"]
    sae = load_sae(path)
    rows = x[:2500]
    with torch.no_grad():
        h = sae.encode(rows)
        rec = sae.reconstruct(rows)
    l0 = float((h > 0).sum(-1).float().mean())
    ev = 1 - float((rec.double() - rows.double()).pow(2).sum() / (rows.double() - rows.double().mean(0)).pow(2).sum())
    assert m["rows"] == 2500 and m["notes"] == []
    assert abs(m["l0"] - l0) < 1e-6 and 0 < l0 < L
    assert abs(m["explained_variance"] - ev) < 1e-6
    # A store from another site is measured, but the report says so.
    write_store(tmp_path / "other", x[:500], shard_rows=500, site="L8R")
    assert main(["inspect-sae", str(path), "--store", str(tmp_path / "other")]) == 0
    assert "captured at L8R, the SAE reads L7R" in capsys.readouterr().out


def test_inspect_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect-sae", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_inspect_names_the_path_of_our_own_sae(tmp_path, capsys):
    from sae import SAEConfig, SparseAutoencoder

    SparseAutoencoder(SAEConfig(d_model=D, n_latents=L, k=4, site="L2R")).save(tmp_path / "ours")
    assert main(["inspect-sae", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert f"SAE            {tmp_path / 'ours'}" in out and "layout         llama3-sae" in out
