"""Decode paths (llama3.decode_paths): every exact path gives the eager model's tokens, hooks included; auto
measures once per machine and shape, caches and reports its choice; forcing and errors."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_random_model, tiny_args
from llama3 import decode_paths
from llama3.decode_paths import AUTO_CANDIDATES, ChoiceCache, DecodeChoice, build_step, kv_bucket, shape_key
from llama3.generation import Llama

pytest.importorskip("llama_models")
from llama3.tokenizer import Tokenizer, default_tokenizer_path  # noqa: E402

EXACT = ("eager", "swapped", "compiled", "inductor", "onednn")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(default_tokenizer_path())


def _model(max_seq_len: int = 64, batch: int = 2):
    args = tiny_args(vocab_size=128256, tie_word_embeddings=True, max_seq_len=max_seq_len)
    model = make_random_model(args, seed=2, std=0.3).eval()
    model.setup_cache(batch, max_seq_len)
    return model


PROMPTS = [[128000, 791, 36360, 20802, 520, 279], [128000, 13347]]


def _tokens(llm: Llama, prompts=PROMPTS, n: int = 10) -> list[list[int]]:
    return [c.tokens for c in llm.generate(prompts, temperature=0.0, max_gen_len=n, stop_tokens=[])]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_each_exact_path_gives_the_eager_tokens_with_and_without_hooks(tokenizer, name):
    model = _model()
    eager, llm = Llama(model, tokenizer), Llama(model, tokenizer, decode_path=name)
    assert _tokens(llm) == _tokens(eager)
    # A steering function at layer 1 and a stored site at layer 0: a compiled path runs those blocks as
    # written, and both paths see the same stored activations at the last step.
    steer = {"L1R": lambda x: x + 3.0 * torch.ones_like(x) / x.shape[-1] ** 0.5}
    results = []
    for which in (eager, llm):
        with model.hooks(["L0R"], steer):
            results.append((_tokens(which), model.activations["L0R"].clone()))
    assert results[0][0] == results[1][0]
    assert results[0][0] != _tokens(eager), "the steering function changed nothing: the test has no teeth"
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_path_reads_a_growing_cache_prefix_and_matches_eager(tokenizer):
    # Positions cross the first 256-position bucket: the compiled step switches to the next prefix length.
    assert [kv_bucket(p, 600) for p in (0, 200, 255, 256, 511, 512, 599)] == [256, 256, 256, 512, 512, 600, 600]
    assert kv_bucket(40, 64) == 64
    model = _model(max_seq_len=600, batch=1)
    prompt = [[128000] + list(range(1000, 1250))]
    eager, compiled = Llama(model, tokenizer), Llama(model, tokenizer, decode_path="compiled")
    assert _tokens(compiled, prompt, n=12) == _tokens(eager, prompt, n=12)


def test_swapped_linear_runs_only_inside_a_step_and_equals_f_linear():
    model = _model(batch=1)
    step = build_step(model, "swapped")
    seen = []
    real = decode_paths._swapped_linear

    def spy(x, w):
        seen.append(tuple(x.shape))
        return real(x, w)

    step._linear = spy
    with torch.inference_mode():
        ref = model(torch.tensor([[128000]]), 0)  # a plain forward: nothing intercepted
        assert seen == []
        out = step(torch.tensor([[128000]]), 0)
    assert len(seen) == 2 * 7 + 1  # seven products per block, and the head
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    x, w = torch.randn(3, 64), torch.randn(40, 64)
    torch.testing.assert_close(real(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    assert real(torch.randn(17, 64), w) is None  # a prefill's rows keep F.linear


def test_auto_measures_once_caches_and_reports(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA3_SAE_DECODE_PATH", raising=False)
    monkeypatch.setenv("LLAMA3_SAE_CACHE", str(tmp_path))
    calls = []

    def fake_calibrate(model, batch, **kw):
        calls.append(batch)
        return DecodeChoice("swapped", {"eager": 10.0, "swapped": 5.0, "int8": 2.0}, {}, batch, 0.1)

    monkeypatch.setattr(decode_paths, "calibrate", fake_calibrate)
    model = _model(batch=4)
    lines: list[str] = []
    llm = Llama(model, tokenizer, decode_path="auto", report=lines.append)
    assert llm.decode_path_for(2) is None
    assert llm.prepare_decode(3) == "swapped"
    _tokens(llm)  # batch 2: the same bucket as 3 (all batches > 1 share the cache's batch size)
    assert calls == [4] and len(lines) == 1
    assert "decode path for batch 4: swapped (800.0 tok/s; eager 400.0; int8 2000.0 (lossy: forced only)" in lines[0]
    assert "measured" in lines[0]
    stored = json.loads((tmp_path / "decode-paths.json").read_text())
    assert list(stored["choices"]) == [shape_key(model, 4)]
    assert "threads" in shape_key(model, 4) and "batch 4" in shape_key(model, 4)
    # A new process (a new Llama) on the same machine and shape reads the cache: nothing is timed again.
    again = Llama(model, tokenizer, decode_path="auto", report=lines.append)
    assert again.prepare_decode(2) == "swapped" and calls == [4]
    assert "cached choice" in lines[1]
    # Batch 1 is its own bucket.
    again.prepare_decode(1)
    assert calls == [4, 1]


def test_unreadable_or_old_cache_is_measured_again(tmp_path):
    cache = ChoiceCache(tmp_path / "d.json")
    (tmp_path / "d.json").write_text("{not json")
    assert cache.get("k") is None
    (tmp_path / "d.json").write_text(json.dumps({"version": 0, "choices": {"k": {}}}))
    assert cache.get("k") is None
    cache.put("k", DecodeChoice("eager", {"eager": 1.0}, {}, 1, 0.5))
    got = cache.get("k")
    assert got is not None and got.path == "eager" and got.cached


def test_calibration_times_every_candidate_and_picks_the_fastest_exact_one():
    model = _model(batch=2)
    choice = decode_paths.calibrate(model, 2, candidates=("eager", "swapped", "int8"), rounds=1, steps=1)
    assert set(choice.step_ms) == {"eager", "swapped", "int8"}
    assert all(v is not None and v > 0 for v in choice.step_ms.values()), choice.notes
    assert choice.path in AUTO_CANDIDATES
    assert choice.step_ms[choice.path] == min(choice.step_ms[n] for n in ("eager", "swapped"))
    # The calibration ran on its own model: the real one is untouched (int8 quantises only its copy).
    assert not any(type(m).__name__ == "Int8Linear" for m in model.modules())


def test_forcing_and_errors(tokenizer, monkeypatch):
    model = _model()
    with pytest.raises(ValueError, match="unknown decode path 'fast'; expected auto or one of eager, swapped"):
        Llama(model, tokenizer, decode_path="fast")
    monkeypatch.setenv("LLAMA3_SAE_DECODE_PATH", "swapped")
    llm = Llama(model, tokenizer, decode_path="auto")
    assert llm.decode_path == "swapped" and llm.prepare_decode(1) == "swapped"
    # An explicit path is not overridden by the environment.
    assert Llama(model, tokenizer, decode_path="eager").decode_path == "eager"


def test_auto_prefill_path_comes_from_the_choice_and_keeps_the_tokens(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA3_SAE_DECODE_PATH", raising=False)
    monkeypatch.setenv("LLAMA3_SAE_CACHE", str(tmp_path))
    monkeypatch.setattr(decode_paths, "calibrate", lambda model, batch, **kw: DecodeChoice(
        "eager", {"eager": 10.0}, {}, batch, 0.1, prefill="swapped", prefill_ms={"eager": 6.0, "swapped": 4.0}))
    rows_seen = []
    real = decode_paths._swapped_linear

    def spy(x, w, max_rows=16):
        rows_seen.append(x.numel() // w.shape[1])
        return real(x, w, max_rows)

    monkeypatch.setattr(decode_paths, "_swapped_linear", spy)
    model = _model()
    lines: list[str] = []
    llm = Llama(model, tokenizer, decode_path="auto", report=lines.append)
    prompts = [list(range(128000, 128000 + 1)) + list(range(500, 530)), list(range(128000, 128000 + 1)) + list(range(600, 630))]
    got = _tokens(llm, prompts, n=6)
    assert "prefill swapped (1.50x eager)" in lines[0]
    assert max(rows_seen) == 2 * 31  # the prefill's products ran swapped (decode steps stay eager here)
    assert got == _tokens(Llama(model, tokenizer), prompts, n=6)


def test_calibration_measures_the_prefill_in_fp32_only():
    model = _model(batch=1)
    choice = decode_paths.calibrate(model, 1, candidates=("eager",), rounds=1, steps=1)
    assert set(choice.prefill_ms) == {"eager", "swapped"} and choice.prefill in ("eager", "swapped")
    bf16 = _model(batch=1).to(torch.bfloat16)
    assert decode_paths.calibrate(bf16, 1, candidates=("eager",), rounds=1, steps=1).prefill_ms == {}


def test_auto_model_dtype_follows_the_cpu_and_the_memory(monkeypatch):
    from llama3_sae import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "_available_memory", lambda: 8 << 30)
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "fma"})
    assert devices.model_dtype("auto", cpu, 4 * 135_000_000) == torch.float32  # emulated bf16: fp32
    assert devices.model_dtype("auto", cpu, 4 * 8_000_000_000) == torch.bfloat16  # 32 GB of fp32 > half of 8 GB
    assert devices.model_dtype("bf16", cpu) == torch.bfloat16  # a named dtype is taken as given
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    assert devices.model_dtype("auto", cpu, 4 * 135_000_000) == torch.bfloat16
    assert devices.model_dtype("auto", torch.device("meta")) == torch.bfloat16  # an accelerator
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        devices.model_dtype("fp8", cpu)
