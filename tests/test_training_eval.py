"""``llama3-sae eval`` against references computed one document at a time with ``sae.metrics``
(so padding, masking and the shared clean pass cannot hide a mistake), plus its files and errors."""

from __future__ import annotations

import json

import pytest
import torch

from llama3.checkpoint import find_tokenizer, load_model
from llama3.tokenizer import Tokenizer
from sae import SAEConfig, SparseAutoencoder
from sae.metrics import downstream_loss, evaluate_reconstruction
from training.cli import main_eval

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The delegates gathered at the conference hall long before the morning session began.",
         "Senior diplomats met.",
         "Humanitarian staff coordinated their efforts with local volunteers to distribute food and clean water.",
         "A vote was postponed after two members asked for more time to read the draft resolution.",
         "Rain.",
         "Foreign officials released a statement calling for an immediate ceasefire along the border."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers import LLAMA3_TOKENIZER_PATH, make_random_model, tiny_args, write_meta_checkpoint

    if LLAMA3_TOKENIZER_PATH is None:
        pytest.skip("needs the Llama 3 tokenizer from the llama-models package (test extra)")
    root = tmp_path_factory.mktemp("eval")
    # A random 2-layer model with the real vocabulary, so real text tokenises as it would for Llama 3.
    model = make_random_model(tiny_args(vocab_size=128256, n_layers=2), seed=1)
    ckpt = write_meta_checkpoint(model, root / "tiny", tokenizer_path=LLAMA3_TOKENIZER_PATH)
    data = root / "heldout.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    saes = []
    for site, n_latents, k, norm in (("L0R", 128, 8, "none"), ("L1M", 256, 16, "per_token")):
        sae = SparseAutoencoder(SAEConfig(d_model=64, n_latents=n_latents, k=k, site=site, normalization=norm,
                                          prepend_bos=False, first_token_excluded=False), seed=3)
        with torch.no_grad():
            sae.b_enc.fill_(0.01)
        path = root / site
        sae.save(path)
        saes.append((path, sae))
    return ckpt, data, saes, root


def test_eval_matches_per_document_references(setup):
    ckpt, data, saes, root = setup
    out = root / "out"
    rc = main_eval(["--sae", *[str(p) for p, _ in saes], "--ckpt-dir", str(ckpt), "--data", str(data),
                    "--out", str(out), "--batch-size", "4", "--max-tokens", "12"])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 10_000
    assert [r["site"] for r in report["saes"]] == ["L0R", "L1M"]
    assert report["documents"] == len(TEXTS) and report["truncated_docs"] > 0

    model = load_model(ckpt, dtype=torch.float32)
    tok = Tokenizer(find_tokenizer(ckpt))
    docs = [torch.tensor([tok.encode(t, bos=False, eos=False)[:12]]) for t in TEXTS]
    assert report["tokens"] == sum(d.shape[1] for d in docs)
    for row, (_, sae) in zip(report["saes"], saes):
        per_doc = [downstream_loss(model, sae, d) for d in docs if d.shape[1] >= 2]
        weights = [d.shape[1] - 1 for d in docs if d.shape[1] >= 2]

        def mean(key, weights=weights, per_doc=per_doc):
            return sum(w * r[key] for w, r in zip(weights, per_doc)) / sum(weights)

        assert row["clean_loss"] == pytest.approx(mean("clean_loss"), rel=1e-5)
        assert row["sae_loss"] == pytest.approx(mean("sae_loss"), rel=1e-5)
        assert row["zero_ablation_loss"] == pytest.approx(mean("zero_ablation_loss"), rel=1e-5)
        assert row["delta_lm_loss"] == pytest.approx(row["sae_loss"] - row["clean_loss"], abs=1e-9)
        fid = (row["sae_loss"] - row["clean_loss"]) / (row["zero_ablation_loss"] - row["clean_loss"])
        assert row["fidelity"] == pytest.approx(fid) and row["loss_recovered"] == pytest.approx(1 - fid)

        model.set_hooks([sae.cfg.site], {})
        acts = [model.forward_activations(d)[sae.cfg.site][0] for d in docs]
        model.set_hooks((), {})
        ref = evaluate_reconstruction(sae, acts)
        assert row["l0"] == pytest.approx(ref.l0, rel=1e-6)
        assert row["explained_variance"] == pytest.approx(ref.explained_variance, rel=1e-5)
        assert row["mse"] == pytest.approx(ref.mse, rel=1e-5)
        assert row["dead_fraction"] == pytest.approx(ref.dead_fraction)


def test_eval_errors_are_clear(setup, tmp_path, capsys):
    ckpt, data, saes, _ = setup
    far = tmp_path / "far"
    SparseAutoencoder(SAEConfig(d_model=64, n_latents=32, k=4, site="L9R")).save(far)
    assert main_eval(["--sae", str(far), "--ckpt-dir", str(ckpt), "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "past the model's last layer" in capsys.readouterr().err
    wide = tmp_path / "wide"
    SparseAutoencoder(SAEConfig(d_model=32, n_latents=32, k=4, site="L0R")).save(wide)
    assert main_eval(["--sae", str(wide), "--ckpt-dir", str(ckpt), "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "d_model=32" in capsys.readouterr().err
    assert main_eval(["--sae", str(saes[0][0]), "--ckpt-dir", str(ckpt), "--data", str(data), "--out",
                      str(tmp_path), "--sites", "L0R,L1R"]) == 2
    assert "one per --sae" in capsys.readouterr().err


def test_eval_plot_draws_one_line_per_sae_when_two_share_a_layer(tmp_path):
    from training.eval import _series, plot_eval

    def row(sae, layer, width=64):
        return {"sae": f"/x/{sae}", "point": "resid_post", "architecture": "topk", "n_latents": width, "layer": layer,
                "l0": 4.0, "explained_variance": 0.5, "delta_lm_loss": 0.1}

    across_layers = [row("a", 2), row("b", 4)]
    assert list(_series(across_layers)) == ["resid_post topk 64"]  # one kind across layers: one line
    same_layer = [row("seed0", 2), row("seed1", 2), row("wide", 2, 128)]
    assert sorted(_series(same_layer)) == ["resid_post topk 128", "resid_post topk 64 · seed0",
                                           "resid_post topk 64 · seed1"]
    pytest.importorskip("matplotlib")
    assert plot_eval(same_layer, tmp_path / "eval.png").stat().st_size > 0
