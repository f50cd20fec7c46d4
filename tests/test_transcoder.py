"""Transcoders end to end on a tiny random Llama 3: capture both ends of an MLP (--sites L1TC), preprocess
both with one seed, train a transcoder (--target-store), and check what it learned against references
computed here: its validation FVU against the stored MLP outputs, the model's MLP replaced by it (eval's
delta LM loss), and inspect-sae's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import LLAMA3_TOKENIZER_PATH, make_random_model, write_meta_checkpoint
from apps.cli import main
from capture.store import ActivationStore
from llama3.args import ModelArgs
from sae import load_sae, sae_hooks

pytestmark = [pytest.mark.skipif(LLAMA3_TOKENIZER_PATH is None, reason="needs llama-models' tokenizer.model"),
              pytest.mark.slow]

SENTENCES = Path(__file__).resolve().parent.parent / "capture" / "data" / "sentences.txt"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tc")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=128256,
                     rope_scaling_factor=32.0, tie_word_embeddings=True, max_seq_len=128)
    model = make_random_model(args, seed=5, std=0.1, norm_jitter=0.2)
    ckpt = write_meta_checkpoint(model, root / "ckpt", tokenizer_path=LLAMA3_TOKENIZER_PATH)
    acts = root / "acts"
    assert main(["capture", "--ckpt-dir", str(ckpt), "--data", str(SENTENCES), "--sites", "L1TC", "--out", str(acts),
                 "--dtype", "fp32", "--no-progress"]) == 0
    for site in ("L1MI", "L1M"):
        assert main(["preprocess", "--store", str(acts / site), "--seed", "3", "--no-progress"]) == 0
    out = root / "tc"
    assert main(["train", "--store", str(acts / "L1MI" / "shuffled"), "--target-store", str(acts / "L1M" / "shuffled"),
                 "--out", str(out), "--n-latents", "256", "--k", "16", "--batch-size", "256", "--steps", "600",
                 "--lr", "3e-3", "--warmup-steps", "10", "--val-every", "0", "--no-progress", "--no-plots"]) == 0
    yield root, ckpt, acts, out
    torch.set_num_threads(n)


def test_capture_of_a_transcoder_pair_lines_up(run):
    _, _, acts, _ = run
    a, b = ActivationStore(acts / "L1MI"), ActivationStore(acts / "L1M")
    assert a.site == "L1MI" and b.site == "L1M" and a.num_rows == b.num_rows > 1000
    for i in range(len(a.shards)):
        ra, rb = a.read_shard(i), b.read_shard(i)
        for col in ("tokens", "doc_ids", "positions"):
            assert torch.equal(ra[col], rb[col])


def test_transcoder_learns_the_mlp_and_reports_its_fvu(run):
    root, ckpt, acts, out = run
    tc = load_sae(out)
    assert tc.cfg.site == "L1TC" and tc.cfg.is_transcoder and not tc.cfg.apply_b_pre_to_input
    summary = json.loads((out / "metrics_summary.json").read_text())
    val = summary["val"]
    # Reference: FVU of the MLP-output prediction on the held-out rows, computed here from the stores.
    from training.data import StoreRows

    rows = StoreRows(acts / "L1MI" / "shuffled", val_fraction=0.01, val_max_rows=65536, seed=0,
                     target=acts / "L1M" / "shuffled")  # train's defaults: the same held-out rows
    x, y = rows.pair(rows.val_ids)
    with torch.no_grad():
        y_hat = tc.reconstruct(x)
    ev = 1 - float((y_hat.double() - y.double()).pow(2).sum() / (y.double() - y.double().mean(0)).pow(2).sum())
    assert val["explained_variance"] == pytest.approx(ev, abs=1e-4)
    # It learned the (nonlinear) MLP: better than the best linear map from input to output, fitted on all rows.
    xa, ya = rows.pair(range(rows.num_rows))
    X = torch.cat([xa.double(), torch.ones(len(xa), 1, dtype=torch.float64)], 1)
    lin = X @ torch.linalg.lstsq(X, ya.double()).solution
    lin_ev = 1 - float((lin - ya.double()).pow(2).sum() / (ya.double() - ya.double().mean(0)).pow(2).sum())
    assert ev > lin_ev + 0.05, (ev, lin_ev)


def test_eval_splices_the_transcoder_in_place_of_the_mlp(run, tmp_path):
    root, ckpt, acts, out = run
    data = tmp_path / "heldout.txt"
    data.write_text("The committee met again on Tuesday to discuss the budget.\nA small boat crossed the bay.\n")
    assert main(["eval", "--sae", str(out), "--ckpt-dir", str(ckpt), "--data", str(data), "--out", str(tmp_path / "e"),
                 "--no-plots"]) == 0
    row = json.loads((tmp_path / "e" / "eval.json").read_text())["saes"][0]
    assert row["site"] == "L1TC"
    # Reference: the loss with block 1's MLP replaced by the transcoder, by hand.
    from llama3.checkpoint import load_model, load_tokenizer

    model = load_model(ckpt, dtype=torch.float32)
    tok = load_tokenizer(ckpt)
    tc = load_sae(out)
    losses, pairs = {}, []
    for name, fns in (("clean", {}), ("sae", sae_hooks(tc, model, mode="reconstruct"))):
        total, n = 0.0, 0
        model.set_hooks(["L1TC"] if name == "clean" else (), fns)
        for line in data.read_text().splitlines():
            t = torch.tensor([tok.encode(line, bos=bool(tc.cfg.prepend_bos), eos=False)])
            with torch.no_grad():
                logits = model(t)
            if name == "clean":  # the MLP's input and output, without the first row (as in training)
                pairs.append((model.activations["L1MI"][0, 1:], model.activations["L1M"][0, 1:]))
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], t[0, 1:], reduction="sum"))
            n += t.shape[1] - 1
        losses[name] = total / n
    model.set_hooks((), {})
    x, y = (torch.cat(p).double() for p in zip(*pairs))
    with torch.no_grad():
        y_hat = tc.reconstruct(x.float()).double()
    assert row["explained_variance"] == pytest.approx(
        1 - float((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()), abs=1e-4)
    assert row["clean_loss"] == pytest.approx(losses["clean"], rel=1e-4)
    assert row["sae_loss"] == pytest.approx(losses["sae"], rel=1e-4)
    assert row["delta_lm_loss"] == pytest.approx(losses["sae"] - losses["clean"], rel=1e-3, abs=1e-5)


def test_inspect_measures_the_transcoder_on_its_pair_of_stores(run, capsys):
    _, _, acts, out = run
    assert main(["inspect-sae", str(out), "--store", str(acts / "L1MI"), "--target-store", str(acts / "L1M"),
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["transcoder"] and r["measured"]["explained_variance"] > 0.5 and r["measured"]["notes"] == []
    assert main(["inspect-sae", str(out), "--store", str(acts / "L1MI")]) == 2
    assert "--target-store" in capsys.readouterr().err
