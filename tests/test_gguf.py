"""GGUF checkpoints: a Llama 3 file written here with gguf's writer against HF's LlamaForCausalLM and Meta's
tokenizer; every supported tensor type against gguf's own dequantizer; bad files; and the real built-in
SmolLM2-135M-Instruct against transformers reading the same file (test_builtin_model.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gguf_support import (hf_from_gguf_weights, llama3_vocab, llama31_rope_divisors, llama_cpp_permute,
                          write_llama_gguf)
from helpers import LLAMA3_TOKENIZER_PATH, make_random_model, rel_err, tiny_args, to_hf_model

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from llama3.checkpoint import detect_layout, load_model, load_tokenizer  # noqa: E402
from llama3.gguf import GGUFFile, read_state_dict  # noqa: E402


@pytest.fixture(autouse=True)
def _no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA3_SAE_CACHE", str(tmp_path / "cache"))


def _hf_twin(args, seed=1):
    model = make_random_model(args, seed=seed)
    return model, to_hf_model(model)


def test_llama3_gguf_logits_and_tokens_match_hf_and_meta(tmp_path):
    """Rope factor 32 through rope_freqs, the real Llama 3 tokenizer as gpt2/llama-bpe, untied head."""
    pytest.importorskip("llama_models")
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta_tok = MetaTokenizer(LLAMA3_TOKENIZER_PATH)
    args = tiny_args(vocab_size=128256, rope_scaling_factor=32.0, rope_theta=500000.0)
    model, hf = _hf_twin(args)
    divisors = llama31_rope_divisors(args.head_dim, args.rope_theta, 32.0)
    vocab = llama3_vocab(LLAMA3_TOKENIZER_PATH, meta_tok.special_tokens)
    path = write_llama_gguf(tmp_path / "llama3.gguf", hf, rope_divisors=divisors, vocab=vocab,
                            bos_id=meta_tok.bos_id, eos_id=meta_tok.eos_id)
    assert detect_layout(path) == "gguf" and detect_layout(tmp_path) == "gguf"  # the file, or its folder
    ours = load_model(path, dtype=torch.float32, max_seq_len=512)
    assert ours.params.use_scaled_rope and ours.params.resolved_rope_scaling_factor == 32.0
    assert not ours.params.tie_word_embeddings
    tokens = torch.randint(0, args.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-5

    tok = load_tokenizer(path)
    assert tok.add_bos and tok.bos_id == meta_tok.bos_id and meta_tok.eot_id in tok.stop_tokens
    texts = ["Hello world", "  spaces   and\ttabs\n\n\nnewlines ", "naïve café — ünïcödé", "😀👍🏽 漢字かなカナ 한국어",
             "def f(x):\n    return x**2  # 1234567 digits 3.14159", "<|eot_id|> typed by a user", "It's we'll I'M"]
    for text in texts:
        assert tok.encode(text, bos=True, eos=False) == meta_tok.encode(text, bos=True, eos=False), text
        assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [meta_tok.eot_id]


def test_tied_head_and_no_rope_scaling(tmp_path):
    args = tiny_args(tie_word_embeddings=True, use_scaled_rope=False, rope_theta=10000.0)
    model, hf = _hf_twin(args, seed=3)
    path = write_llama_gguf(tmp_path / "tied.gguf", hf)
    ours = load_model(path, dtype=torch.float32)
    assert ours.params.tie_word_embeddings and not ours.params.use_scaled_rope
    assert ours.output.weight is ours.tok_embeddings.weight
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-5


@pytest.mark.parametrize("kind", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_files_compute_what_their_dequantized_weights_compute(tmp_path, kind):
    """Quantized matrices (dim 256 so every block size divides the rows) read as gguf dequantizes them."""
    args = tiny_args(dim=256, n_heads=4, n_kv_heads=2, multiple_of=256, vocab_size=512, use_scaled_rope=False)
    model, hf = _hf_twin(args, seed=5)
    quant = {f"blk.{i}.{m}.weight": kind for i in range(args.n_layers)
             for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    quant["token_embd.weight"] = kind
    path = write_llama_gguf(tmp_path / f"{kind.name}.gguf", hf, quant=quant)
    f = GGUFFile(path)
    assert f.tensor_type("blk.0.attn_q.weight") == kind.name
    ours = load_model(path, dtype=torch.float32)
    ref = hf_from_gguf_weights(hf, path)
    tokens = torch.randint(0, args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(ours(tokens), ref(tokens).logits) < 1e-5
    # And the dequantized weights are close to the originals (a wrong block layout would not be).
    original = model.layers[0].attention.wq.weight
    assert rel_err(ours.layers[0].attention.wq.weight, original) < (0.2 if kind.name.startswith("Q4") else 0.1)


def _k_quant_bytes(kind, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid K-quant blocks (gguf cannot quantize these in Python): random codes, small f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    where = {Q.Q2_K: [size - 4, size - 2], Q.Q3_K: [size - 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [size - 2]}
    for at in where[kind]:
        raw[..., at:at + 2] = scale
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_read_as_gguf_dequantizes_them(tmp_path, kind):
    rows, cols = 40, 512
    raw = _k_quant_bytes(kind, rows, cols)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=kind)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    f = GGUFFile(tmp_path / "k.gguf")
    assert f.shape("blk.0.attn_q.weight") == (rows, cols)
    from gguf import quants

    want = torch.from_numpy(quants.dequantize(raw, kind))
    for dtype in (torch.float32, torch.bfloat16):
        got = f.read("blk.0.attn_q.weight", dtype)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert torch.equal(got.float(), want.to(dtype).float())


def test_reads_in_row_chunks(tmp_path, monkeypatch):
    import llama3.gguf as mod

    monkeypatch.setattr(mod, "_CHUNK_BYTES", 1000)  # a few rows per chunk
    args = tiny_args(dim=256, n_heads=4, n_kv_heads=2, multiple_of=256, vocab_size=300, use_scaled_rope=False)
    model, hf = _hf_twin(args, seed=6)
    path = write_llama_gguf(tmp_path / "q8.gguf", hf, quant={"token_embd.weight": Q.Q8_0})
    f = GGUFFile(path)
    from gguf import quants

    t = f.tensors["token_embd.weight"]
    assert torch.equal(f.read("token_embd.weight", torch.float32), torch.from_numpy(quants.dequantize(t.data, t.tensor_type)))


def test_dequantized_weights_are_cached_by_hash(tmp_path, monkeypatch):
    args = tiny_args(use_scaled_rope=False)
    model, hf = _hf_twin(args, seed=7)
    path = write_llama_gguf(tmp_path / "m.gguf", hf)
    first = load_model(path, dtype=torch.float32)
    entries = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "weights.safetensors").is_file()
    assert (tmp_path / "cache" / "gguf" / "hashes.json").is_file()  # the file is hashed once per version
    import llama3.gguf as mod

    monkeypatch.setattr(mod, "GGUFFile", None)  # a second load must not open the GGUF at all
    second = load_model(path, dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    monkeypatch.setenv("LLAMA3_SAE_GGUF_CACHE", "0")
    with pytest.raises(TypeError):  # with the cache off, the (disabled) reader is needed again
        load_model(path, dtype=torch.float32)


def test_llama_cpp_layout_is_metas(tmp_path):
    """llama.cpp's q/k permutation is exactly HF -> Meta: the file's rows are used as stored."""
    args = tiny_args()
    model, hf = _hf_twin(args, seed=8)
    hf_q = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"].detach().numpy()
    assert np.array_equal(llama_cpp_permute(hf_q, args.n_heads), model.layers[0].attention.wq.weight.detach().numpy())


# --------------------------------------------------------------------------- bad files
def _tiny_file(tmp_path, **kw):
    args = tiny_args(use_scaled_rope=False)
    _, hf = _hf_twin(args, seed=9)
    return write_llama_gguf(tmp_path / "bad.gguf", hf, **kw)


def test_unknown_architecture_is_named(tmp_path):
    path = _tiny_file(tmp_path, arch="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        load_model(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 64 // block * size), dtype=np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"stored as Q8_1, which is not supported; supported types: F32"):
        GGUFFile(tmp_path / "q81.gguf").read("blk.0.attn_q.weight", torch.float32)


def test_truncated_file_is_named(tmp_path):
    path = _tiny_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"(truncated|cannot read).*download it again"):
        load_model(path)


def test_metadata_that_does_not_fit_the_tensors(tmp_path):
    args = tiny_args(use_scaled_rope=False)
    _, hf = _hf_twin(args, seed=10)
    hf.config.num_hidden_layers = 3  # the file claims a third block it does not hold
    path = write_llama_gguf(tmp_path / "short.gguf", hf)
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.2\."):
        load_model(path)


def test_two_gguf_files_in_a_folder_must_be_chosen(tmp_path):
    _tiny_file(tmp_path)
    (tmp_path / "other.gguf").write_bytes((tmp_path / "bad.gguf").read_bytes())
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        detect_layout(tmp_path)


def test_state_dict_names_every_problem(tmp_path):
    path = _tiny_file(tmp_path)
    f = GGUFFile(path)
    params = f.model_args()
    wrong = params.replace(dim=128, n_heads=8)
    with pytest.raises(ValueError, match="shape mismatch for token_embd.weight"):
        read_state_dict(f, wrong)


def test_model_args_and_tokenizer_come_from_the_cache_once_written(tmp_path, monkeypatch):
    from llama3.checkpoint import read_model_args

    args = tiny_args(use_scaled_rope=False)
    _, hf = _hf_twin(args, seed=12)
    path = write_llama_gguf(tmp_path / "m.gguf", hf)
    first = read_model_args(path)  # no cache yet: read from the file
    load_model(path, dtype=torch.float32)  # writes the cache
    import llama3.checkpoint as ck

    monkeypatch.setattr(ck, "GGUFFile", None)  # the file is not opened again
    assert read_model_args(path, max_seq_len=64) == first.replace(max_seq_len=64)
