"""The checkpoint key table: Hugging Face tensor names <-> Meta's (which the model uses), the rotary
permutation between their Q/K layouts, and how Meta's model-parallel shards split each tensor."""

from __future__ import annotations

import re

import torch

# HF name -> Meta name, "{}" standing for the layer index (torchtitan's state_dict_adapter style).
HF_TO_META: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
META_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_META.items()}

# HF's conversion script permutes the rows of wq/wk from Meta's interleaved rotary pairs
# (x[2i], x[2i+1]) to the rotate-half layout (x[i], x[i + hd/2]); loading undoes it per head.
# Value: which ModelArgs field holds the number of heads of that matrix.
HF_ROTARY_PERMUTED: dict[str, str] = {
    "layers.{}.attention.wq.weight": "n_heads",
    "layers.{}.attention.wk.weight": "n_kv_heads",
}


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> Meta's interleaved pairs (inverse of transformers' ``permute``)."""
    d_out, d_in = w.shape
    return w.view(n_heads, 2, d_out // n_heads // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved pairs -> HF's rotate-half row order (transformers' ``permute``)."""
    d_out, d_in = w.shape
    return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


# How Meta's fairscale model-parallel layers split each tensor over consolidated.NN.pth (the dim the
# shards are concatenated on to merge them). ColumnParallelLinear splits output features (dim 0),
# RowParallelLinear input features (dim 1); norms are replicated (None). The embedding is split on the
# vocabulary by Llama 3's VocabParallelEmbedding but on the features by Llama 2's ParallelEmbedding,
# so its dim is read from the shard shapes ("by_shape").
META_SHARD_DIM: dict[str, int | None | str] = {
    "tok_embeddings.weight": "by_shape",
    "layers.{}.attention.wq.weight": 0,
    "layers.{}.attention.wk.weight": 0,
    "layers.{}.attention.wv.weight": 0,
    "layers.{}.attention.wo.weight": 1,
    "layers.{}.feed_forward.w1.weight": 0,
    "layers.{}.feed_forward.w2.weight": 1,
    "layers.{}.feed_forward.w3.weight": 0,
    "layers.{}.attention_norm.weight": None,
    "layers.{}.ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
}

# Derived rotary buffers some checkpoints carry (Llama 2's rope.freqs, old HF inv_freq); the model
# recomputes them from its config, so they are skipped rather than reported as unexpected.
DERIVED_KEYS = re.compile(r"^(rope\.freqs|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq)$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def key_template(name: str) -> tuple[str, str | None]:
    """``"layers.3.attention.wq.weight"`` -> ``("layers.{}.attention.wq.weight", "3")``."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end():], m.group(1)


def hf_to_meta_name(name: str) -> str | None:
    """The Meta name of an HF tensor name, or None when the table has no entry for it."""
    template, layer = key_template(name)
    meta = HF_TO_META.get(template)
    return None if meta is None else meta.format(layer)


def meta_to_hf_name(name: str) -> str | None:
    template, layer = key_template(name)
    hf = META_TO_HF.get(template)
    return None if hf is None else hf.format(layer)
