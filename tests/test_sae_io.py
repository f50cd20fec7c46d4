"""This project's SAE directory: exact round trip, version and shape checks, latent labels."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae import SAEConfig, SparseAutoencoder, load_sae, read_latents, write_latents
from sae.config import FORMAT_VERSION


def trained_like(activation="jumprelu", normalization="dataset", **kw):
    k = 3 if activation in ("topk", "batchtopk") else None
    cfg = SAEConfig(d_model=8, n_latents=24, architecture=activation, k=k, normalization=normalization,
                    site="L2R", model_name="tiny", **kw)
    sae = SparseAutoencoder(cfg, seed=5)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(24, generator=g))
    if normalization == "dataset":
        sae.set_dataset_norm(3.7, 2.9, shift=torch.randn(8, generator=g))
    return sae


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
@pytest.mark.parametrize("normalization", ["none", "per_token", "dataset"])
def test_round_trip_is_exact(tmp_path, activation, normalization):
    sae = trained_like(activation, normalization, norm_eps=1.2345e-6, rank_by_decoder_norm=activation == "topk")
    sae.save(tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert back.cfg == sae.cfg
    a, b = sae.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    x = torch.randn(10, 8)
    assert torch.equal(sae.reconstruct(x), back.reconstruct(x))
    on_disk = json.loads((tmp_path / "sae" / "config.json").read_text())
    # Nothing version 2 added is used, so the file is version 1: older releases read it.
    assert on_disk["format"] == "llama3-sae" and on_disk["format_version"] == 1 and "skip_connection" not in on_disk
    assert on_disk["site"] == "L2R" and on_disk["normalization"] == normalization


@pytest.mark.parametrize("change", [{"skip_connection": True}, {"normalization": "per_token_rms"}, {"site": "L2TC"}])
def test_version_2_features_round_trip(tmp_path, change):
    sae = SparseAutoencoder(SAEConfig(d_model=8, n_latents=24, k=3, site="L2R").replace(**change), seed=3)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    sae.save(tmp_path / "s")
    on_disk = json.loads((tmp_path / "s" / "config.json").read_text())
    assert on_disk["format_version"] == FORMAT_VERSION == 2
    back = load_sae(tmp_path / "s")
    assert back.cfg == sae.cfg
    x = torch.randn(10, 8) * 3
    assert torch.equal(sae.reconstruct(x), back.reconstruct(x))


def test_bf16_round_trip_and_save_keeps_labels(tmp_path):
    sae = trained_like("topk", "none", dtype="bfloat16")
    d = tmp_path / "sae"
    d.mkdir()
    write_latents(d, [{"latent": 5, "label": "UN", "certainty": 0.9}, {"latent": 1, "label": "dogs"}])
    sae.save(d)
    back = load_sae(d)
    assert back.W_enc.dtype == torch.bfloat16 and torch.equal(back.W_enc, sae.W_enc)
    labels = read_latents(d)
    assert labels[5]["label"] == "UN" and labels[1]["label"] == "dogs"
    assert [json.loads(line)["latent"] for line in (d / "latents.jsonl").read_text().splitlines()] == [1, 5]
    assert not list(d.glob(".*tmp"))  # no temporary files left behind


def test_unknown_version_and_keys_are_rejected(tmp_path):
    sae = trained_like("topk", "none")
    sae.save(tmp_path / "s")
    cfg_path = tmp_path / "s" / "config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"format_version={FORMAT_VERSION + 1} is not supported"):
        load_sae(tmp_path / "s")
    cfg_path.write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_sae(tmp_path / "s")


def test_tensor_mismatch_is_a_clear_error(tmp_path):
    sae = trained_like("topk", "none")
    sae.save(tmp_path / "s")
    weights = tmp_path / "s" / "sae.safetensors"
    tensors = load_file(weights)
    tensors["W_dec"] = tensors["W_dec"][:, :7].contiguous()
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"W_dec has shape \(24, 7\)"):
        load_sae(tmp_path / "s")
    del tensors["W_dec"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="missing \\['W_dec'\\]"):
        load_sae(tmp_path / "s")


def test_latents_jsonl_errors(tmp_path):
    assert read_latents(tmp_path) == {}
    (tmp_path / "latents.jsonl").write_text('{"latent": 1}\n{"label": "no id"}\n')
    with pytest.raises(ValueError, match="latents.jsonl:2"):
        read_latents(tmp_path)


def test_missing_or_unknown_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "nope")
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="no known SAE layout"):
        load_sae(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        load_sae(tmp_path / "junk.txt")
