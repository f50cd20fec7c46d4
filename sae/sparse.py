"""Sparse codes and the two kernels that keep training and inference away from dense latent matrices.

A code is kept as ``(values, indices)``, both ``[N, m]``: row ``n`` has latent ``indices[n, j]`` at
``values[n, j]``. Rows with fewer than ``m`` active latents are padded with value 0 (any index), so
padding changes nothing in a decode or a gradient. TopK codes have ``m = k``.

* ``sparse_decode`` gathers the ``m`` decoder rows of each token (``embedding_bag`` with per-sample
  weights) instead of multiplying a mostly-zero [N, n_latents] code by the whole decoder.
* ``gathered_relu_linear`` returns relu(W x + b) at chosen indices. Its forward takes the values from
  the dense encoder matmul the caller already did (the encoder stays dense); its backward touches only
  the chosen rows, where autograd through ``topk`` would build a dense [N, n_latents] gradient and run
  another full matmul with it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

DENSE_FRACTION = 1 / 16
"""When a code keeps more than this fraction of all latents per row (ReLU SAEs early in training), the
gather kernels lose to a plain matmul, so both functions switch to the dense computation."""


class SparseCode(NamedTuple):
    values: torch.Tensor
    """[..., m] activations, >= 0; padding slots are 0."""
    indices: torch.Tensor
    """[..., m] int64 latent ids."""

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """[..., n_latents] with zeros where a latent is off."""
        out = self.values.new_zeros(*self.values.shape[:-1], n_latents)
        # scatter_add, not scatter: padding may repeat an index that is also active in the row.
        return out.scatter_add(-1, self.indices, self.values)

    def flatten(self) -> "SparseCode":
        n, m = math.prod(self.values.shape[:-1]), self.values.shape[-1]  # explicit n: m may be 0
        return SparseCode(self.values.reshape(n, m), self.indices.reshape(n, m))

    def unflatten(self, leading: torch.Size | tuple[int, ...]) -> "SparseCode":
        m = self.values.shape[-1]
        return SparseCode(self.values.reshape(*leading, m), self.indices.reshape(*leading, m))


def is_dense_regime(m: int, n_latents: int) -> bool:
    return m > n_latents * DENSE_FRACTION


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j values[n, j] * weight[indices[n, j]] -> [N, d]; differentiable in values and weight.

    values, indices: [N, m]; weight: [n_latents, d] (one row per latent).
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [N, m]")
    n_latents = weight.shape[0]
    if values.shape[1] == 0:
        return values.new_zeros(values.shape[0], weight.shape[1])
    if is_dense_regime(values.shape[1], n_latents):
        dense = values.new_zeros(values.shape[0], n_latents).scatter_add(1, indices, values)
        return dense @ weight
    return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")


GATHER_CHUNK_ELEMENTS = 1 << 24
"""Gathered weight entries per chunk in ``gathered_pre`` (64 MiB of float32)."""


@torch.no_grad()
def gathered_pre(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(x @ weight.T + bias).gather(1, indices) without the dense [N, n_latents] product: each token's
    chosen rows only, a chunk of tokens at a time. x: [N, d]; indices: [N, m] -> [N, m]."""
    n, m = indices.shape
    out = torch.empty(n, m, dtype=weight.dtype, device=weight.device)
    rows = max(1, GATHER_CHUNK_ELEMENTS // max(1, m * weight.shape[1]))
    for i in range(0, n, rows):
        idx = indices[i:i + rows]
        w = weight[idx]  # [rows, m, d]
        torch.baddbmm(bias[idx].unsqueeze(2), w, x[i:i + rows].to(weight.dtype).unsqueeze(2),
                      out=out[i:i + rows].unsqueeze(2))
    return out


class _GatheredReluLinear(torch.autograd.Function):
    """relu(x W^T + b) at ``indices``, with forward values supplied and a row-sparse backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                indices: torch.Tensor, relu_values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, indices, relu_values)
        ctx.n_latents = weight.shape[0]
        return relu_values.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, indices, relu_values = ctx.saved_tensors
        # d relu: the gradient passes only where the value is positive (padding is 0, so it is dropped too).
        g = grad_out * (relu_values > 0).to(grad_out.dtype)  # [N, m]
        grad_x = grad_w = grad_b = None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if need_x or need_w:
            # d/dx  = sum_j g[n, j] W[idx[n, j]]      : an embedding_bag of W with weights g.
            # d/dW[l] = sum_{(n,j): idx = l} g[n, j] x[n] : that embedding_bag's VJP with cotangent x.
            with torch.enable_grad():
                w = weight.detach().requires_grad_(need_w)
                gx = F.embedding_bag(indices, w, per_sample_weights=g.to(weight.dtype), mode="sum")
                if need_w:
                    (grad_w,) = torch.autograd.grad(gx, w, x.to(gx.dtype))
            grad_x = gx.detach().to(x.dtype) if need_x else None
        if need_b:
            grad_b = g.new_zeros(ctx.n_latents).index_add_(0, indices.reshape(-1), g.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


def gathered_relu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, indices: torch.Tensor,
                         relu_values: torch.Tensor) -> torch.Tensor:
    """relu(x @ weight.T + bias).gather(1, indices), differentiable in x, weight and bias.

    ``relu_values`` must be exactly that quantity computed without autograd (from the caller's dense
    encoder pass); the function only attaches the sparse backward. Zeros in it (inactive or padding
    slots) get no gradient, as relu's derivative says.
    """
    if indices.shape[1] == 0 or not (torch.is_grad_enabled()
                                     and (x.requires_grad or weight.requires_grad or bias.requires_grad)):
        return relu_values
    if is_dense_regime(indices.shape[1], weight.shape[0]):
        return F.linear(x, weight, bias).gather(1, indices).relu()
    return _GatheredReluLinear.apply(x, weight, bias, indices, relu_values)
