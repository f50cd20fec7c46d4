"""The compiled decode step and int8 weight-only decoding against the eager bf16/fp32 model."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import make_random_model, tiny_args
from llama3.generation import Llama
from llama3.quant import Int8Linear, quantize_int8

pytest.importorskip("llama_models")
from llama3.tokenizer import Tokenizer, default_tokenizer_path  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(default_tokenizer_path())


def _llm(tokenizer, dtype=torch.float32) -> Llama:
    args = tiny_args(vocab_size=128256, tie_word_embeddings=True, max_seq_len=64)
    model = make_random_model(args, seed=2, std=0.3, dtype=dtype).eval()
    model.setup_cache(2, 64)
    return Llama(model, tokenizer)


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(tokenizer):
    llm = _llm(tokenizer)
    prompts = ["The delegates gathered at the", "Hi"]
    eager = llm.text_completion(prompts, temperature=0.0, max_gen_len=12, stop_tokens=[])
    from torch._dynamo.utils import counters

    llm.compile()
    compiled = llm.text_completion(prompts, temperature=0.0, max_gen_len=12, stop_tokens=[])
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the step was compiled (the counter counts what dynamo hands to a backend)
    # Generations with other prompt lengths and positions reuse the compiled step: no stride- or
    # position-driven recompiles (the step's shapes are static: [batch, 1] tokens and the cache).
    again = llm.text_completion(["A longer prompt than the others here", "Yes"], temperature=0.0, max_gen_len=5,
                                stop_tokens=[])
    assert [len(c.tokens) for c in again] == [5, 5]
    assert counters["stats"]["unique_graphs"] == graphs, "the decode step was compiled again"
    # Another batch size is another static shape: compiled once, then reused.
    for _ in range(2):
        llm.text_completion(["One row"], temperature=0.0, max_gen_len=3, stop_tokens=[])
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_int8_linear_matches_dequantised_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    q = Int8Linear.from_linear(lin)
    w = q.weight.float() * q.scales.float()[:, None]
    # Per weight: half a quantisation step, plus the bf16 rounding of the row's scale times |q| <= 127.
    bound = q.scales.float() * (0.5 + 127 * 2.0**-8)
    assert ((w - lin.weight.float()).abs() <= bound[:, None] + 1e-7).all()
    for rows in (1, 40):  # the fused int8 kernel path and the prefill path
        x = torch.randn(rows, 64).to(torch.bfloat16)
        ref = x.float() @ w.T
        torch.testing.assert_close(q(x).float(), ref, rtol=2e-2, atol=2e-2)


def test_int8_model_stays_close_to_bf16(tokenizer):
    llm = _llm(tokenizer, dtype=torch.bfloat16)
    ref_model = copy.deepcopy(llm.model)
    quantize_int8(llm.model)
    assert any(isinstance(m, Int8Linear) for m in llm.model.modules())
    tokens = torch.tensor([tokenizer.encode("The delegates gathered at the", bos=True, eos=False)])
    llm.model.free_cache()
    ref_model.free_cache()
    with torch.no_grad():
        a, b = llm.model(tokens), ref_model(tokens)
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 0.05, rel
    assert (a[0, -1].argmax() == b[0, -1].argmax()).item()
