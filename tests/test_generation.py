"""Generation: batching, stop tokens, sampling, streaming deltas, and input errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llama3 import Llama, ModelArgs, Tokenizer, Transformer
from llama3.model import init_random_weights

pytest.importorskip("llama_models")
from llama3.tokenizer import default_tokenizer_path  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(default_tokenizer_path())


def _model(max_batch: int = 4, max_seq_len: int = 128, seed: int = 0) -> Transformer:
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=128256,
                     rope_scaling_factor=32.0, tie_word_embeddings=True, max_seq_len=max_seq_len)
    # A large init std makes the logits of a random model peaked enough that greedy ties never happen.
    model = init_random_weights(Transformer(args), seed=seed, std=0.3).eval()
    model.setup_cache(max_batch, max_seq_len)
    return model


@pytest.fixture(scope="module")
def llm(tokenizer) -> Llama:
    return Llama(_model(), tokenizer)


PROMPTS = ["The delegates gathered at the", "Hi", "Foreign officials released a statement about the new"]


def test_greedy_batched_equals_each_alone(llm):
    batched = llm.text_completion(PROMPTS, temperature=0.0, max_gen_len=12)
    for prompt, got in zip(PROMPTS, batched):
        alone = llm.text_completion([prompt], temperature=0.0, max_gen_len=12)[0]
        assert got.tokens == alone.tokens
        assert got.text == alone.text
        assert got.stop_reason == alone.stop_reason


def test_greedy_follows_full_forward_argmax(llm, tokenizer):
    prompt = tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    out = llm.generate([prompt], temperature=0.0, max_gen_len=8, stop_tokens=[])[0]
    seq = list(prompt)
    model = llm.model
    cache = [b.attention.cache for b in model.layers]
    model.free_cache()  # the reference is a plain full forward, no cache
    try:
        with torch.no_grad():
            for _ in range(8):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    finally:
        for b, c in zip(model.layers, cache):
            b.attention.cache = c
    assert out.tokens == seq[len(prompt):]
    assert out.stop_reason == "length"


def test_each_row_stops_on_its_own_stop_token(llm):
    free = llm.text_completion(PROMPTS, temperature=0.0, max_gen_len=10, stop_tokens=[])
    stops = {free[0].tokens[2], free[2].tokens[6]}
    out = llm.text_completion(PROMPTS, temperature=0.0, max_gen_len=10, stop_tokens=stops)
    for comp, ref in zip(out, free):
        first = next((j for j, t in enumerate(ref.tokens) if t in stops), None)
        if first is None:
            assert comp.tokens == ref.tokens and comp.stop_reason == "length"
        else:  # the row ends at its own first stop token, which is not returned
            assert comp.tokens == ref.tokens[:first] and comp.stop_reason == "stop"
    assert out[0].stop_reason == out[2].stop_reason == "stop"


def test_default_stop_tokens_apply_to_text_completion(tokenizer):
    model = _model(seed=3)
    with torch.no_grad():  # make <|eot_id|> win after the first generated token
        model.output.weight = nn.Parameter(model.output.weight.detach().clone())
        model.output.weight[tokenizer.eot_id] = model.output.weight[tokenizer.eot_id] * 0
    llm = Llama(model, tokenizer)
    ref = llm.text_completion(["Hello there"], temperature=0.0, max_gen_len=6, stop_tokens=[])[0]
    # Replace the token chosen at step 2 by <|eot_id|>: copy its output row so eot ties it, then nudge.
    with torch.no_grad():
        model.output.weight[tokenizer.eot_id] = model.output.weight[ref.tokens[2]] * 1.01
    out = llm.text_completion(["Hello there"], temperature=0.0, max_gen_len=6)[0]
    assert out.stop_reason == "stop"
    assert out.tokens == ref.tokens[:2]
    assert tokenizer.eot_id not in out.tokens


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    a = llm.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=10, seed=7)
    b = llm.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=10, seed=7)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    # Row i samples with seed + i, so a prompt alone with seed + i reproduces its row.
    for i, prompt in enumerate(PROMPTS):
        alone = llm.text_completion([prompt], temperature=1.0, top_p=0.95, max_gen_len=10, seed=7 + i)[0]
        assert alone.tokens == a[i].tokens
    c = llm.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=10, seed=8)
    assert [x.tokens for x in c] != [x.tokens for x in a]


def test_tiny_top_p_is_greedy(llm):
    greedy = llm.text_completion(PROMPTS, temperature=0.0, max_gen_len=8)
    nucleus = llm.text_completion(PROMPTS, temperature=0.7, top_p=1e-6, max_gen_len=8, seed=1)
    assert [c.tokens for c in greedy] == [c.tokens for c in nucleus]


def test_stream_deltas_concatenate_to_text(llm):
    texts = [""] * len(PROMPTS)
    last = None
    for step in llm.stream_text_completion(PROMPTS, temperature=0.9, max_gen_len=16, seed=3):
        assert len(step.deltas) == len(PROMPTS)
        for i, d in enumerate(step.deltas):
            texts[i] += d
        last = step
    assert last is not None and last.completions is not None and all(last.done)
    for text, comp in zip(texts, last.completions):
        assert text == comp.text


class _Scripted(nn.Module):
    """Stands in for the model to force an exact token sequence through the streaming decoder."""

    def __init__(self, script: list[int], vocab: int, prompt_len: int):
        super().__init__()
        self.script, self.vocab, self.prompt_len = script, vocab, prompt_len
        self.tok_embeddings = nn.Embedding(1, 1)

    cache_shape = (1, 64)

    def forward(self, tokens, start_pos, last_only=False):
        step = start_pos + tokens.shape[1] - self.prompt_len
        logits = torch.zeros(tokens.shape[0], 1, self.vocab)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits


def test_streaming_never_splits_a_utf8_character(tokenizer):
    # Find a character whose UTF-8 bytes are split over several tokens when encoded byte by byte.
    # One token per byte, so every multi-byte character arrives split over several steps.
    text = "日本語 🎉 é"
    byte_ids = [tokenizer.model.encode_single_token(bytes([b])) for b in text.encode()]
    prompt = tokenizer.encode("x", bos=True, eos=False)
    llm = Llama(_Scripted(byte_ids + [tokenizer.eot_id], tokenizer.n_words, len(prompt)), tokenizer)
    deltas = []
    for step in llm.stream([prompt], temperature=0.0, max_gen_len=64):
        deltas.append(step.deltas[0])
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert step.completions[0].text == text


def test_input_errors(llm, tokenizer):
    too_many = ["a"] * 5
    with pytest.raises(ValueError, match="max_batch_size"):
        llm.text_completion(too_many, max_gen_len=2)
    long_prompt = "word " * 200
    with pytest.raises(ValueError, match="max_seq_len"):
        llm.text_completion([long_prompt], max_gen_len=2)
    with pytest.raises(ValueError, match="temperature"):
        llm.text_completion(["a"], temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        llm.text_completion(["a"], top_p=0)
    with pytest.raises(ValueError, match="list of strings"):
        llm.text_completion("a single string")
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], max_gen_len=2)


def test_generation_stops_at_max_seq_len(tokenizer):
    llm = Llama(_model(max_batch=1, max_seq_len=24), tokenizer)
    prompt = tokenizer.encode("one two three four five", bos=True, eos=False)
    out = llm.generate([prompt], temperature=0.0, max_gen_len=100, stop_tokens=[])[0]
    assert len(prompt) + len(out.tokens) == 24
    assert out.stop_reason == "max_seq_len"


def test_chat_completion_uses_chat_format(llm):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    out = llm.chat_completion([dialog], temperature=0.0, max_gen_len=5)[0]
    assert out.prompt_tokens == llm.formatter.encode_dialog_prompt(dialog)
    with pytest.raises(ValueError, match="list of dialogs"):
        llm.chat_completion(dialog)
