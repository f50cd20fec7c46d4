"""Shared test utilities: tiny random Llama models, their HF twins, and checkpoint writers.

Import as ``from helpers import ...`` (``tests/conftest.py`` puts this folder on ``sys.path``) or
``from tests.helpers import ...``.

The writers here are deliberately independent of ``llama3.checkpoint``'s reader: the Meta shard
splitter follows Meta's fairscale layers, and the HF twin uses the permutation of transformers'
``convert_llama_weights_to_hf.py``, so a wrong table in the reader cannot be cancelled by the same
mistake in the writer.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from llama3.args import ModelArgs
from llama3.model import Transformer, init_random_weights

# The Llama 3 tokenizer shipped inside Meta's llama-models package (a test dependency).
try:
    import llama_models.llama3 as _llama_models_llama3

    LLAMA3_TOKENIZER_PATH: Path | None = Path(_llama_models_llama3.__file__).parent / "tokenizer.model"
    if not LLAMA3_TOKENIZER_PATH.is_file():
        LLAMA3_TOKENIZER_PATH = None
except ImportError:  # pragma: no cover - llama-models is in the test extra
    LLAMA3_TOKENIZER_PATH = None


def tiny_args(**kw) -> ModelArgs:
    """A 2-layer Llama 3 shape small enough for CPU tests (dim 64, 4 heads, 2 kv heads, vocab 300).

    hidden_dim is 192 (dim 64, multiple_of 32), so every weight splits evenly into 1, 2 or 4 shards."""
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                rope_scaling_factor=32.0, tie_word_embeddings=False, max_seq_len=512, max_batch_size=4)
    base.update(kw)
    return ModelArgs(**base)


def make_random_model(args: ModelArgs | None = None, *, seed: int = 0, std: float = 0.02,
                      norm_jitter: float = 0.1, dtype: torch.dtype = torch.float32, **hooks) -> Transformer:
    """A Transformer with seeded random weights, norm weights jittered around 1, in eval mode.

    ``hooks`` go to the constructor (``store_layer_activ=...``, ``sae_layer_forward_fn=...``)."""
    model = Transformer(args or tiny_args(), **hooks).to(dtype)
    return init_random_weights(model, seed=seed, std=std, norm_jitter=norm_jitter).eval()


def random_tokens(vocab_size: int, batch: int = 2, seq: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in the Frobenius norm, ||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------- HF twin
def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> HF's rotate-half layout (transformers' conversion script)."""
    d_out, d_in = w.shape
    return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def hf_config(params: ModelArgs, rope_factor: float | None = None):
    """A transformers ``LlamaConfig`` with the same shape and numerics as ``params``."""
    import transformers

    rope = None
    if params.use_scaled_rope:
        rope = {"rope_type": "llama3", "factor": rope_factor or params.resolved_rope_scaling_factor,
                "low_freq_factor": params.rope_low_freq_factor, "high_freq_factor": params.rope_high_freq_factor,
                "original_max_position_embeddings": params.rope_original_max_pos}
    return transformers.LlamaConfig(
        hidden_size=params.dim, intermediate_size=params.hidden_dim, num_hidden_layers=params.n_layers,
        num_attention_heads=params.n_heads, num_key_value_heads=params.n_kv_heads, vocab_size=params.vocab_size,
        rms_norm_eps=params.norm_eps, rope_theta=params.rope_theta, rope_scaling=rope,
        max_position_embeddings=131072, tie_word_embeddings=params.tie_word_embeddings,
    )


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF names, q/k permuted to HF's rotary layout (fresh tensors)."""
    p = model.params
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not p.tie_word_embeddings:
        sd["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = permute_meta_to_hf(layer.attention.wq.weight, p.n_heads)
        sd[pre + "self_attn.k_proj.weight"] = permute_meta_to_hf(layer.attention.wk.weight, p.n_kv_heads)
        sd[pre + "self_attn.v_proj.weight"] = layer.attention.wv.weight
        sd[pre + "self_attn.o_proj.weight"] = layer.attention.wo.weight
        sd[pre + "mlp.gate_proj.weight"] = layer.feed_forward.w1.weight
        sd[pre + "mlp.down_proj.weight"] = layer.feed_forward.w2.weight
        sd[pre + "mlp.up_proj.weight"] = layer.feed_forward.w3.weight
        sd[pre + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[pre + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
    return {k: v.detach().float().clone().contiguous() for k, v in sd.items()}


def to_hf_model(model: Transformer, rope_factor: float | None = None):
    """A transformers ``LlamaForCausalLM`` (fp32, eval) with the same weights as ``model``.

    ``rope_factor`` overrides the RoPE scaling factor of the HF twin (to test that a wrong one shows)."""
    import transformers

    # Built on the meta device and assigned our weights: HF's random init of a large model is slow.
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config(model.params, rope_factor))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    # The rotary inverse frequencies are a non-persistent buffer: rebuild that module off the meta device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not meta, meta
    if model.params.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf.float().eval()


# --------------------------------------------------------------------------- checkpoint writers
# How Meta's fairscale model-parallel layers split each weight over consolidated.NN.pth, written out
# here independently of llama3.checkpoint: ColumnParallelLinear splits output features (dim 0),
# RowParallelLinear input features (dim 1), norms are replicated. tok_embeddings: Llama 3's
# VocabParallelEmbedding splits the vocabulary (dim 0), Llama 2's ParallelEmbedding split dim 1.
_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
           "feed_forward.w3.weight", "output.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")


def split_meta_state_dict(sd: dict[str, torch.Tensor], n_shards: int, n_kv_heads: int,
                          embedding_split_dim: int = 0) -> list[dict[str, torch.Tensor]]:
    """Split a full state dict into ``n_shards`` model-parallel shards the way Meta's checkpoints are.

    With more shards than kv heads each kv head is repeated over ``n_shards // n_kv_heads``
    consecutive shards (Meta's reshard_mp ``repeat_qk_qv``; e.g. Llama 3.1 405B MP16)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for key, t in sd.items():
        if key.endswith(_COLUMN):
            if key.endswith(("wk.weight", "wv.weight")) and n_shards > n_kv_heads:
                t = _repeat_kv(t, n_shards, n_kv_heads)
            parts = t.chunk(n_shards, dim=0)
        elif key.endswith(_ROW):
            parts = t.chunk(n_shards, dim=1)
        elif key == "tok_embeddings.weight":
            parts = t.chunk(n_shards, dim=embedding_split_dim)
        else:
            parts = [t] * n_shards
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def _repeat_kv(t: torch.Tensor, n_shards: int, n_kv_heads: int) -> torch.Tensor:
    # [n_kv_heads * hd, dim] -> [n_shards * hd, dim], head h repeated for shards h*rep .. h*rep+rep-1.
    rep = n_shards // n_kv_heads
    heads = t.view(n_kv_heads, -1, t.shape[1])
    return heads.repeat_interleave(rep, dim=0).reshape(-1, t.shape[1])


def meta_params_json(params: ModelArgs) -> dict:
    """params.json as Meta writes it, plus rope_scaling_factor so nothing is guessed from shapes."""
    out = {"dim": params.dim, "n_layers": params.n_layers, "n_heads": params.n_heads,
           "n_kv_heads": params.n_kv_heads, "vocab_size": params.vocab_size, "multiple_of": params.multiple_of,
           "ffn_dim_multiplier": params.ffn_dim_multiplier, "norm_eps": params.norm_eps,
           "rope_theta": params.rope_theta, "use_scaled_rope": params.use_scaled_rope,
           "rope_scaling_factor": params.resolved_rope_scaling_factor}
    return {k: v for k, v in out.items() if v is not None}


def write_meta_checkpoint(model: Transformer, ckpt_dir: str | Path, n_shards: int = 1, *,
                          embedding_split_dim: int = 0, with_output: bool = True, share_tied: bool = True,
                          tokenizer_path: str | Path | None = None, params: dict | None = None) -> Path:
    """Write ``params.json`` and ``consolidated.NN.pth`` as Meta's release does.

    A tied model's ``output.weight`` is saved as the embedding's own storage (what ``torch.save`` of a
    tied module does) unless ``share_tied=False`` (then an equal, separate copy); ``with_output=False``
    omits it. ``params`` replaces the params.json contents."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    if not with_output:
        sd.pop("output.weight")
    (ckpt_dir / "params.json").write_text(json.dumps(params if params is not None else meta_params_json(model.params)))
    for i, shard in enumerate(split_meta_state_dict(sd, n_shards, model.params.n_kv_heads, embedding_split_dim)):
        if model.params.tie_word_embeddings and with_output and share_tied and embedding_split_dim == 0:
            shard["output.weight"] = shard["tok_embeddings.weight"]
        torch.save(shard, ckpt_dir / f"consolidated.{i:02d}.pth")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, ckpt_dir / "tokenizer.model")
    return ckpt_dir


def write_hf_checkpoint(model: Transformer, ckpt_dir: str | Path, sharded: bool = False, *,
                        tokenizer_path: str | Path | None = None, hf_model=None) -> Path:
    """Write an HF checkpoint with transformers' own ``save_pretrained`` (safetensors; several shards and
    ``model.safetensors.index.json`` when ``sharded``); the tokenizer goes to ``original/tokenizer.model``."""
    ckpt_dir = Path(ckpt_dir)
    hf = hf_model if hf_model is not None else to_hf_model(model)
    hf.save_pretrained(ckpt_dir, max_shard_size="40KB" if sharded else "50GB")
    if tokenizer_path is not None:
        (ckpt_dir / "original").mkdir(exist_ok=True)
        shutil.copyfile(tokenizer_path, ckpt_dir / "original" / "tokenizer.model")
    return ckpt_dir


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (needs root, as CI and these machines have; skips otherwise),
    for real full-disk and read-only file systems. Yields the mount point; unmounted afterwards."""
    import subprocess

    import pytest

    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)
