"""Llama 3.1/3.2 text model in plain PyTorch, with hook sites for storing activations and splicing SAEs.

Parameter names follow Meta's checkpoints (``wq``, ``w1..w3``, ``attention_norm``) so the checkpoint
key table stays trivial. No I/O, no distributed code: dtype, device, compilation and parallelism are
applied from outside to a built module.

Hook sites are ``(layer, point)``; the points, in the order data flows through block ``L``:
``resid_pre`` -> ``attn_in`` -> ``attn_out`` -> ``resid_mid`` -> ``mlp_in`` -> ``mlp_out`` -> ``resid_post``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llama3_sae.sites import (  # noqa: F401 (re-exported)
    POINTS,
    SHORT_NAMES,
    SHORT_OF,
    TRANSCODER,
    Site,
    parse_site,
    site_name,
)

from .args import ModelArgs

SaeFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 squares lose too much), cast back, then scale: Meta's order.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(params: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] with Llama 3's long-context scaling applied."""
    hd = params.head_dim
    freqs = 1.0 / (params.rope_theta ** (torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd))
    if not params.use_scaled_rope:
        return freqs
    factor = params.resolved_rope_scaling_factor
    low, high, old_len = params.rope_low_freq_factor, params.rope_high_freq_factor, params.rope_original_max_pos
    wavelen = 2 * math.pi / freqs
    # Short wavelengths keep their frequency, long ones are divided by the factor, and the band in
    # between is interpolated linearly in (old_len / wavelen).
    smooth = ((old_len / wavelen) - low) / (high - low)
    interpolated = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen < old_len / high, freqs, interpolated)
    return torch.where(wavelen > old_len / low, freqs / factor, out)


def rope_tables(params: ModelArgs, n_positions: int, device: torch.device | str | None = None):
    """cos and sin tables [n_positions, head_dim // 2] in fp32."""
    freqs = rope_frequencies(params, device)
    angles = torch.outer(torch.arange(n_positions, device=device, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as Meta's complex formulation does. x: [B, T, H, hd]."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, T, H, hd/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # [1, T, 1, hd/2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Static cache [max_batch, n_kv_heads, max_seq_len, head_dim] for incremental decoding."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Attention(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.n_heads = params.n_heads
        self.n_kv_heads = params.n_kv_heads
        self.head_dim = params.head_dim
        self.wq = nn.Linear(params.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(params.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(params.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, params.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                start_pos: int | torch.Tensor, use_cache: bool, kv_len: int | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]

        mask = None
        # A branch, not `T > 1`: with dynamic shapes under torch.compile that is a SymBool, which SDPA rejects.
        is_causal = True if T > 1 else False
        if use_cache:
            cache = self.cache
            if isinstance(start_pos, torch.Tensor):
                # Static-shape path (torch.compile): write at the given positions, attend over the first
                # kv_len positions of the cache (default: all of it) with a mask, so every decode step has
                # the same shapes.
                pos = start_pos + torch.arange(T, device=x.device)
                cache.k[:B].index_copy_(2, pos, k)
                cache.v[:B].index_copy_(2, pos, v)
                k, v = cache.k[:B, :, :kv_len], cache.v[:B, :, :kv_len]
                mask = torch.arange(k.shape[2], device=x.device)[None, :] <= pos[:, None]  # [T, S]
                is_causal = False
            else:
                end = start_pos + T
                cache.k[:B, :, start_pos:end] = k
                cache.v[:B, :, start_pos:end] = v
                if start_pos > 0:
                    k, v = cache.k[:B, :, :end], cache.v[:B, :, :end]
                    if T > 1:
                        mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(start_pos)
                    is_causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, params: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(params)
        self.feed_forward = FeedForward(params.dim, params.hidden_dim)
        self.attention_norm = RMSNorm(params.dim, params.norm_eps)
        self.ffn_norm = RMSNorm(params.dim, params.norm_eps)
        # Hook state, set by Transformer.set_hooks: points whose value is stored, and functions per point.
        self.store_points: tuple[str, ...] = ()
        self.fns: dict[str, SaeFn] = {}

    def _site(self, point: str, x: torch.Tensor, acts: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if acts is not None and point in self.store_points:
            acts[f"L{self.layer_id}{SHORT_OF[point]}"] = x  # the value before any SAE function
        fn = self.fns.get(point)
        return x if fn is None else fn(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor,
                use_cache: bool, acts: dict[str, torch.Tensor] | None, kv_len: int | None = None) -> torch.Tensor:
        if not self.store_points and not self.fns:
            h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, use_cache, kv_len)
            return h + self.feed_forward(self.ffn_norm(h))
        x = self._site("resid_pre", x, acts)
        a = self._site("attn_in", self.attention_norm(x), acts)
        a = self._site("attn_out", self.attention(a, cos, sin, start_pos, use_cache, kv_len), acts)
        h = self._site("resid_mid", x + a, acts)
        m = self._site("mlp_in", self.ffn_norm(h), acts)
        tc = self.fns.get(TRANSCODER)
        if tc is None:
            out = self.feed_forward(m)
        elif getattr(tc, "keeps_mlp", False):  # steering through a transcoder: f(mlp_in, mlp_out) -> mlp_out'
            out = tc(m, self.feed_forward(m))
        else:
            out = tc(m)
        m = self._site("mlp_out", out, acts)
        return self._site("resid_post", h + m, acts)


# --------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    """Llama 3 decoder.

    Args:
        params: model shape.
        store_layer_activ: sites whose activations are kept in ``self.activations`` (keyed by short name,
            e.g. ``"L15R"``) after each forward; a bare int means that layer's ``resid_post``.
        sae_layer_forward_fn: ``{site: f}``; ``f(x) -> x'`` replaces the activation at that site for every
            position, with or without the KV cache. A site ``(L, "mlp")`` / ``"L{L}TC"`` replaces block L's
            MLP (a transcoder): ``f(mlp_in) -> mlp_out``, or, when ``f.keeps_mlp`` is true,
            ``f(mlp_in, mlp_out) -> mlp_out'`` (the MLP still runs; steering edits its output). Stored
            activations are taken before the function.
    """

    def __init__(self, params: ModelArgs, store_layer_activ: Iterable | None = None,
                 sae_layer_forward_fn: Mapping | None = None):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(params, params.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activations: dict[str, torch.Tensor] = {}
        self.store_sites: tuple[Site, ...] = ()
        self.sae_fns: dict[Site, SaeFn] = {}
        self.set_hooks(store_layer_activ, sae_layer_forward_fn)

    # ------------------------------------------------------------------ hooks
    def set_hooks(self, store_layer_activ: Iterable | None = None, sae_layer_forward_fn: Mapping | None = None) -> None:
        """Replace the stored sites and SAE functions (the constructor's hooks) on a built model."""
        store: list[Site] = []
        for s in [store_layer_activ] if isinstance(store_layer_activ, (int, str, Site)) else (store_layer_activ or ()):
            site = parse_site(s)
            # A transcoder site stores both ends of the MLP.
            store += [Site(site.layer, "mlp_in"), Site(site.layer, "mlp_out")] if site.point == TRANSCODER else [site]
        fns = {parse_site(s): f for s, f in (sae_layer_forward_fn or {}).items()}
        for site in [*store, *fns]:
            if site.layer >= self.params.n_layers:
                raise ValueError(f"hook site {site_name(site)} is past the last layer "
                                 f"(this model has layers 0..{self.params.n_layers - 1})")
        for f in fns.values():
            if not callable(f):
                raise ValueError(f"sae_layer_forward_fn values must be callables f(x) -> x', got {type(f).__name__}")
        self.store_sites = tuple(dict.fromkeys(store))
        self.sae_fns = fns
        for block in self.layers:
            block.store_points = tuple(s.point for s in self.store_sites if s.layer == block.layer_id)
            block.fns = {s.point: f for s, f in fns.items() if s.layer == block.layer_id}

    @contextlib.contextmanager
    def hooks(self, store_layer_activ: Iterable | None = None, sae_layer_forward_fn: Mapping | None = None
              ) -> Iterator["Transformer"]:
        """``set_hooks`` for the duration of a ``with`` block; the model has no hooks again afterwards.

            with model.hooks(["L8R"], {"L12R": steer}):
                logits = model(tokens)            # model.activations["L8R"] holds layer 8's output
        """
        self.set_hooks(store_layer_activ, sae_layer_forward_fn)
        try:
            yield self
        finally:
            self.set_hooks(None, None)

    @contextlib.contextmanager
    def without_cache(self) -> Iterator["Transformer"]:
        """A plain causal forward inside the block even when a KV cache is allocated: the cache is set aside
        (not written, e.g. by a forward that builds an autograd graph) and restored afterwards."""
        caches = [block.attention.cache for block in self.layers]
        for block in self.layers:
            block.attention.cache = None
        try:
            yield self
        finally:
            for block, cache in zip(self.layers, caches):
                block.attention.cache = cache

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the rotary tables cover."""
        return int(self.rope_cos.shape[0])

    # ------------------------------------------------------------------ buffers and cache
    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary tables, e.g. after building on the meta device."""
        device = device if device is not None else self.tok_embeddings.weight.device
        cos, sin = rope_tables(self.params, self.params.max_seq_len, device)
        self.rope_cos, self.rope_sin = cos, sin

    def setup_cache(self, max_batch_size: int | None = None, max_seq_len: int | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Allocate the static KV cache that ``forward(tokens, start_pos)`` then uses (generation only)."""
        max_batch_size = max_batch_size or self.params.max_batch_size
        max_seq_len = max_seq_len or self.params.max_seq_len
        if max_seq_len > self.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's rotary table "
                             f"({self.max_seq_len}); build the model with a larger max_seq_len")
        weight = self.tok_embeddings.weight
        for block in self.layers:
            block.attention.cache = KVCache(max_batch_size, max_seq_len, self.params.n_kv_heads,
                                            self.params.head_dim, dtype or weight.dtype, device or weight.device)

    def free_cache(self) -> None:
        for block in self.layers:
            block.attention.cache = None

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(max_batch_size, max_seq_len) of the KV cache, or None when there is none."""
        cache = self.layers[0].attention.cache if len(self.layers) else None
        return None if cache is None else (cache.k.shape[0], cache.k.shape[2])

    # ------------------------------------------------------------------ forward
    def check_input(self, tokens: torch.Tensor, start_pos: int | torch.Tensor) -> bool:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        shape = self.cache_shape
        if shape is None:
            if not isinstance(start_pos, torch.Tensor) and start_pos != 0:
                raise ValueError("start_pos > 0 needs the KV cache: call model.setup_cache(...) first")
            limit = self.max_seq_len
        else:
            if B > shape[0]:
                raise ValueError(f"batch of {B} exceeds the KV cache's max_batch_size={shape[0]}")
            limit = shape[1]
        if not isinstance(start_pos, torch.Tensor) and start_pos + T > limit:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len={limit}")
        return shape is not None

    def rope_at(self, start_pos: int | torch.Tensor, T: int):
        if isinstance(start_pos, torch.Tensor):
            pos = start_pos + torch.arange(T, device=self.rope_cos.device)
            return self.rope_cos[pos], self.rope_sin[pos]
        return self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, *, last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] -> float32 logits [B, T, vocab] (or [B, 1, vocab] with ``last_only``).

        With a KV cache (``setup_cache``), continues from ``start_pos`` as Meta's reference does; a
        0-dim tensor ``start_pos`` takes the static-shape path that torch.compile likes.
        """
        use_cache = self.check_input(tokens, start_pos)
        acts: dict[str, torch.Tensor] | None = {} if self.store_sites else None
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_at(start_pos, tokens.shape[1])
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, use_cache, acts)
        if acts is not None:
            self.activations = acts
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def forward_activations(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run only as far as the deepest stored site (no later layers, no output head), without the
        KV cache, and return the stored activations {short name: [B, T, dim]}."""
        if not self.store_sites:
            raise ValueError("no sites to store: build the Transformer with store_layer_activ=[...]")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_seq_len={self.max_seq_len}")
        last = max(s.layer for s in self.store_sites)
        acts: dict[str, torch.Tensor] = {}
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_at(0, tokens.shape[1])
        for layer in self.layers[: last + 1]:
            h = layer(h, cos, sin, 0, False, acts)
        self.activations = acts
        return acts


def init_random_weights(model: Transformer, seed: int = 0, std: float = 0.02, norm_jitter: float = 0.0) -> Transformer:
    """Seeded random weights (normal(0, std) matrices; norm weights 1, optionally jittered so tests can
    tell a norm that is applied from one that is not). Works for any dtype/device the model is on."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                value = 1.0 + norm_jitter * torch.randn(p.shape, generator=g)
            else:
                value = std * torch.randn(p.shape, generator=g)
            p.copy_(value.to(p.dtype))
    return model
