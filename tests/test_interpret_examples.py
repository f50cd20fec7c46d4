"""top-examples on a tiny model + tiny SAE against a brute-force computation, one document at a time,
and resume after an interruption (in process and SIGKILL) against an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import LLAMA3_TOKENIZER_PATH, make_random_model, write_meta_checkpoint
from interpret.examples import TopExamplesConfig, hash_keys, merge_top, run_top_examples
from interpret.records import AGGREGATIONS, iter_examples
from llama3.args import ModelArgs

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(LLAMA3_TOKENIZER_PATH is None, reason="needs llama-models' tokenizer.model")]

REPO = Path(__file__).resolve().parent.parent
SENTENCES = REPO / "capture" / "data" / "sentences.txt"
N_DOCS = 96
N_LATENTS = 256
DEAD = 255


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=128256,
                     rope_scaling_factor=32.0, tie_word_embeddings=True, max_seq_len=256)
    model = make_random_model(args, seed=5, std=0.1, norm_jitter=0.2)
    return write_meta_checkpoint(model, tmp_path_factory.mktemp("ckpt"), tokenizer_path=LLAMA3_TOKENIZER_PATH)


def _make_sae(path: Path, first_token_excluded: bool | None = False) -> Path:
    from sae import SAEConfig, SparseAutoencoder

    # Trained (as it were) on every row, first tokens included: the brute-force reference credits them all.
    sae = SparseAutoencoder(SAEConfig(d_model=64, n_latents=N_LATENTS, k=4, site="L1R", model_name="tiny",
                                      prepend_bos=False, first_token_excluded=first_token_excluded), seed=1)
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e4  # never positive: a dead latent
    sae.save(path)
    return path


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """Dense activations of every document, computed one document at a time."""
    from capture.config import SourceConfig
    from capture.sources import iter_documents
    from llama3.checkpoint import load_model
    from llama3.tokenizer import Tokenizer
    from sae import load_sae

    sae_dir = _make_sae(tmp_path_factory.mktemp("sae") / "sae")
    tok = Tokenizer(LLAMA3_TOKENIZER_PATH)
    model = load_model(ckpt, dtype=torch.float32, store_layer_activ=["L1R"])
    sae = load_sae(sae_dir)
    docs = {}
    with torch.inference_mode():
        for d in iter_documents(SourceConfig(data=(SENTENCES,), limit=N_DOCS)):
            ids = tok.encode(d.text, bos=False, eos=False)[:192]
            x = model.forward_activations(torch.tensor([ids]))["L1R"][0]
            docs[d.doc_id] = {"ids": ids, "text": tok.decode(ids), "h": sae.encode(x)}  # [T, L]
    return sae_dir, docs


def _cfg(ckpt: Path, sae: Path, out: Path, **kw) -> TopExamplesConfig:
    base = dict(ckpt_dir=ckpt, sae=sae, data=(SENTENCES,), limit=N_DOCS, out=out, top_n=5, n_quantiles=3,
                quantile_examples=2, score_examples=1, random_examples=4, reservoir=12, random_pool=40,
                device="cpu", model_dtype="fp32", tokens_per_batch=400, window_docs=32, memory_mb=0.05,
                progress=False)
    base.update(kw)
    return TopExamplesConfig(**base)


def _expected_top(docs: dict, latent: int, agg: str, n: int) -> list[tuple[int, float]]:
    vals = []
    for d, r in docs.items():
        h = r["h"][:, latent]
        v = {"max": h.max(), "mean": h.mean(), "last": h[-1]}[agg].item()
        if v > 0:
            vals.append((v, d))
    return [(d, v) for v, d in sorted(vals, reverse=True)[:n]]


def test_top_examples_match_brute_force(ckpt, reference, tmp_path):
    sae_dir, docs = reference
    out = tmp_path / "out"
    cfg = _cfg(ckpt, sae_dir, out)
    # A memory budget this small forces many encoder chunks and document groups per batch.
    run_top_examples(cfg)
    meta = json.loads((out / "top_examples.json").read_text())
    assert meta["complete"] and meta["n_latents"] == N_LATENTS and meta["docs"] == N_DOCS
    assert meta["tokens"] == sum(len(r["ids"]) for r in docs.values())
    recs = {r.latent: r for r in iter_examples(out)}
    assert sorted(recs) == list(range(N_LATENTS))

    live = n_shown = n_held = 0
    for lat, rec in recs.items():
        H = {d: r["h"][:, lat] for d, r in docs.items()}
        active = [d for d, h in H.items() if h.max() > 0]
        assert rec.stats["active_docs"] == len(active)
        assert rec.stats["active_tokens"] == sum(int((h > 0).sum()) for h in H.values())
        assert rec.stats["max"] == pytest.approx(max((h.max().item() for h in H.values()), default=0.0), rel=1e-5)
        assert rec.stats["sum"] == pytest.approx(sum(h.sum().item() for h in H.values()), rel=1e-4, abs=1e-6)
        if lat == DEAD:
            assert not active and rec.is_dead and not rec.docs and not any(rec.top.values())
            continue
        live += bool(active)
        for agg in AGGREGATIONS:
            exp = _expected_top(docs, lat, agg, cfg.top_n)
            got = rec.top[agg]
            # The same documents, up to exact ties (first-token activations are often equal); ties go to
            # the smaller document id.
            assert len(got) == len(exp) and [v for _, v in got] == pytest.approx([v for _, v in exp], rel=1e-4)
            brute = {d: v for d, v in _expected_top(docs, lat, agg, N_DOCS)}
            assert [brute.get(d) for d, _ in got] == pytest.approx([v for _, v in got], rel=1e-4), (lat, agg)
            strict = [d for d, v in exp if v > exp[-1][1] * (1 + 1e-5)]
            assert set(strict) <= {d for d, _ in got}
            ties = [d for d, v in got if v == got[-1][1]]
            assert ties == sorted(ties)
        # Per-token activations and text of every stored document, exactly as brute force has them.
        for d, ex in rec.docs.items():
            h = H[d]
            assert ex.text == docs[d]["text"] and len(ex.tokens) == len(docs[d]["ids"])
            want = [(p, h[p].item()) for p in range(len(h)) if h[p] > 0]
            assert [p for p, _ in ex.acts] == [p for p, _ in want]
            assert [v for _, v in ex.acts] == pytest.approx([v for _, v in want], rel=1e-4)
        top_docs = {d for agg in AGGREGATIONS for d, _ in rec.top[agg]}
        shown = {d for q in rec.quantiles for d, _ in q["examples"]}
        held = {d for d, _ in rec.score_active}
        assert not (shown & top_docs) and not (held & (top_docs | shown))
        for q in rec.quantiles:
            for d, v in q["examples"]:
                assert 0 < v and q["lo"] <= v <= q["hi"] and v == pytest.approx(H[d].max().item(), rel=1e-4)
        assert [q["lo"] for q in rec.quantiles] == sorted(q["lo"] for q in rec.quantiles)
        for d, v in rec.score_active:
            assert H[d].max().item() == pytest.approx(v, rel=1e-4) and v > 0
        # Bins cut the latent's reservoir (min(reservoir, activating documents) of them) by rank.
        assert len(rec.quantiles) == min(cfg.n_quantiles, cfg.reservoir, len(active))
        n_shown += len(shown)
        n_held += len(held)
        assert len(rec.score_random) == (cfg.random_examples if active else 0)
        for d in rec.score_random:
            assert H[d].max() == 0 and rec.docs[d].acts == []
    # Every latent that fired has examples (the seed credited only each sentence's strongest latent).
    assert live == sum(1 for lat in range(N_LATENTS) if recs[lat].stats["active_docs"] > 0) > 200
    assert n_shown > live and n_held > live / 2


RESUME_OPTS = dict(top_n=4, reservoir=8, random_pool=30, window_docs=4, limit=48)


@pytest.fixture(scope="module")
def uninterrupted(ckpt, reference, tmp_path_factory) -> str:
    """The output of one uninterrupted run with RESUME_OPTS, which resumed runs must reproduce exactly."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_top_examples(_cfg(ckpt, reference[0], out, **RESUME_OPTS))
    return (out / "top_examples.jsonl").read_text()


@pytest.mark.parametrize("excluded", [True, None])
def test_first_tokens_are_never_credited_unless_the_sae_was_trained_on_them(ckpt, reference, tmp_path, excluded):
    """An SAE trained without first-token rows (or one that does not say) is not credited there: the
    first position is an attention sink whose activations are outliers."""
    _, docs = reference
    sae_dir = _make_sae(tmp_path / "sae", first_token_excluded=excluded)
    run_top_examples(_cfg(ckpt, sae_dir, tmp_path / "out"))
    for rec in iter_examples(tmp_path / "out"):
        H = {d: r["h"][1:, rec.latent] for d, r in docs.items()}
        assert rec.stats["active_docs"] == sum(bool(h.max() > 0) for h in H.values() if h.numel())
        assert all(pos > 0 for ex in rec.docs.values() for pos, _ in ex.acts)


def test_resume_after_interruptions_equals_uninterrupted(ckpt, reference, uninterrupted, tmp_path, monkeypatch):
    from interpret import examples as ex

    sae_dir, _ = reference
    expected = uninterrupted
    out = tmp_path / "out"
    cfg = _cfg(ckpt, sae_dir, out, checkpoint_every_s=0, **RESUME_OPTS)
    real_batches = ex._batches
    calls = {"n": 0}

    def flaky(limit):
        def batches(*a, **k):
            for item in real_batches(*a, **k):
                calls["n"] += 1
                if calls["n"] == limit:
                    raise KeyboardInterrupt  # what a kill leaves behind: work after the last save is lost
                yield item
        return batches

    monkeypatch.setattr(ex, "_batches", flaky(12))  # in the scan pass
    with pytest.raises(KeyboardInterrupt):
        run_top_examples(cfg)
    state = json.loads((out / "top_examples.work" / "state.json").read_text())
    assert state["phase"] == "scan" and 0 < state["docs_done"] < RESUME_OPTS["limit"]
    calls["n"] = 0
    monkeypatch.setattr(ex, "_batches", flaky(8))  # resumes the scan, then stops in the detail pass
    with pytest.raises(KeyboardInterrupt):
        run_top_examples(cfg)
    state = json.loads((out / "top_examples.work" / "state.json").read_text())
    assert state["phase"] == "detail" and state["detail_docs_done"] > 0 and state["parts"]
    monkeypatch.setattr(ex, "_batches", real_batches)
    run_top_examples(cfg)
    assert (out / "top_examples.jsonl").read_text() == expected
    assert not (out / "top_examples.work").exists()
    before = (out / "top_examples.jsonl").stat().st_mtime_ns
    assert run_top_examples(cfg) == out / "top_examples.jsonl"  # finished: a rerun is a no-op
    assert (out / "top_examples.jsonl").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match=r"other options \(top_n: \d+ -> \d+\); pass --overwrite"):
        run_top_examples(dataclasses.replace(cfg, top_n=cfg.top_n + 1))


def test_sigkill_and_rerun_through_the_cli(ckpt, reference, uninterrupted, tmp_path):
    sae_dir, _ = reference
    c = _cfg(ckpt, sae_dir, tmp_path, **RESUME_OPTS)
    opts = ["--ckpt-dir", str(ckpt), "--sae", str(sae_dir), "--data", str(SENTENCES),
            "--device", "cpu", "--model-dtype", "fp32", "--checkpoint-every-s", "0", "--no-progress"]
    for name in ("limit", "top_n", "n_quantiles", "quantile_examples", "score_examples", "random_examples", "reservoir",
                 "random_pool", "tokens_per_batch", "window_docs", "memory_mb"):
        opts += ["--" + name.replace("_", "-"), str(getattr(c, name))]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "interpret", "top-examples", *opts, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state_path = out / "top_examples.work" / "state.json"
    deadline, done = time.monotonic() + 90, 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(state_path.read_text())["docs_done"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            done = 0
        if done >= 16:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "top_examples.jsonl").exists()
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming top-examples" in rerun.stderr
    assert (out / "top_examples.jsonl").read_text() == uninterrupted


def test_changed_options_refused_and_user_errors(ckpt, reference, tmp_path, monkeypatch):
    from interpret import examples as ex

    sae_dir, _ = reference
    out = tmp_path / "out"
    cfg = _cfg(ckpt, sae_dir, out, checkpoint_every_s=0)

    real = ex._batches
    seen = []

    def two_then_stop(*a, **k):
        for item in real(*a, **k):
            seen.append(1)
            if len(seen) == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(ex, "_batches", two_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_top_examples(cfg)
    monkeypatch.setattr(ex, "_batches", real)
    with pytest.raises(ValueError, match=r"other options \(top_n: \d+ -> \d+\)"):
        run_top_examples(_cfg(ckpt, sae_dir, out, top_n=7))
    with pytest.raises(ValueError, match="--tokens-per-batch"):
        _cfg(ckpt, sae_dir, out, tokens_per_batch=10)
    with pytest.raises(ValueError, match="--random-examples"):
        _cfg(ckpt, sae_dir, out, random_examples=50, random_pool=10)


def test_hash_and_merge_are_order_independent():
    docs = torch.arange(1000, dtype=torch.int64) * 7919 + (1 << 33)  # also ids past 2^31
    lat = torch.arange(5)
    keys = hash_keys(docs, lat, seed=3, salt=1)
    assert keys.shape == (1000, 5) and keys.min() >= 0 and keys.max() < 2**31
    assert keys.unique().numel() > 4990  # spread out
    assert not torch.equal(keys, hash_keys(docs, lat, seed=4, salt=1))

    def run(order):
        vals, ids = torch.full((5, 8), -1, dtype=torch.int64), torch.full((5, 8), -1, dtype=torch.int64)
        for chunk in order.split(37):
            vals, ids = merge_top(vals, ids, keys[chunk].T, docs[chunk][None, :])
        return ids.sort(1).values

    a = run(torch.arange(1000))
    b = run(torch.randperm(1000, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(a, b)
    top = keys.T.topk(8, dim=1).indices
    assert torch.equal(a, docs[top].sort(1).values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu_run(ckpt, reference, uninterrupted, tmp_path):
    """The device path (int64 sorts, scatter_reduce, bincount on CUDA) selects what the CPU run selects."""
    out = tmp_path / "cuda"
    run_top_examples(_cfg(ckpt, reference[0], out, device="cuda", **RESUME_OPTS))
    got = {r.latent: r for r in iter_examples(out)}
    want = {r.latent: r for r in (__import__("interpret.records").records.LatentExamples.from_json(json.loads(x))
                                  for x in uninterrupted.splitlines())}
    for lat, w in want.items():
        g = got[lat]
        assert g.stats["active_docs"] == w.stats["active_docs"]
        for agg in AGGREGATIONS:
            assert [v for _, v in g.top[agg]] == pytest.approx([v for _, v in w.top[agg]], rel=1e-3)
        assert g.score_random == w.score_random


def test_a_read_only_output_is_one_line_and_the_run_finishes_once_writable(ckpt, reference, tmp_path, capsys):
    """Top examples written beside an SAE on a file system remounted read-only (a tmpfs: needs root)."""
    import shutil

    from helpers import remount, small_tmpfs
    from interpret.cli import main

    sae_dir, _ = reference
    with small_tmpfs(tmp_path / "disk", "16m") as disk:
        sae = disk / "sae"
        shutil.copytree(sae_dir, sae)
        remount(disk, "ro")
        argv = ["--ckpt-dir", str(ckpt), "--sae", str(sae), "--data", str(SENTENCES), "--limit", "16",
                "--device", "cpu", "--model-dtype", "fp32", "--no-progress"]
        assert main(["top-examples", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write" in err[0] and str(sae) in err[0] and "read-only" in err[0]
        remount(disk, "rw")
        assert main(["top-examples", *argv]) == 0
        assert json.loads((sae / "top_examples.json").read_text())["complete"]


def test_a_transcoder_is_credited_with_its_mlp_input(ckpt, tmp_path):
    from capture.config import SourceConfig
    from capture.sources import iter_documents
    from llama3.checkpoint import load_model
    from llama3.tokenizer import Tokenizer
    from sae import SAEConfig, SparseAutoencoder

    tc = SparseAutoencoder(SAEConfig(d_model=64, n_latents=64, k=4, site="L1TC", prepend_bos=False,
                                     first_token_excluded=False, apply_b_pre_to_input=False), seed=2)
    tc.save(tmp_path / "tc")
    run_top_examples(_cfg(ckpt, tmp_path / "tc", tmp_path / "out", limit=24))
    recs = {r.latent: r for r in iter_examples(tmp_path / "out")}
    tok = Tokenizer(LLAMA3_TOKENIZER_PATH)
    model = load_model(ckpt, dtype=torch.float32, store_layer_activ=["L1TC"])
    best: dict[int, float] = {}
    with torch.inference_mode():
        for d in iter_documents(SourceConfig(data=(SENTENCES,), limit=24)):
            ids = tok.encode(d.text, bos=False, eos=False)[:192]
            h = tc.encode(model.forward_activations(torch.tensor([ids]))["L1MI"][0])  # the MLP input
            for lat, v in enumerate(h.max(0).values.tolist()):
                best[lat] = max(best.get(lat, 0.0), v)
    assert sum(v > 0 for v in best.values()) > 10
    for lat, rec in recs.items():
        assert rec.stats["max"] == pytest.approx(best[lat], rel=1e-5, abs=1e-7)
