"""Int8 weight-only quantisation for decoding: applied from outside to a built model.

Each ``nn.Linear`` of the blocks and the output head becomes an ``Int8Linear`` holding the weight as
int8 with one scale per output row (symmetric, absmax / 127). Activations stay in the model's dtype;
the product dequantises on the fly, so a batch-1 decode step reads half the bytes of bf16. On CPU a
few rows run ``torch._weight_int8pack_mm`` (a fused int8 x bf16 kernel) and a prefill converts the
weight block by block for the dtype's own matmul; elsewhere the weight is converted for the product
(under torch.compile on GPU inductor fuses the conversion into the matrix-vector loop).

The embedding table stays as it is (a lookup reads one row). With a tied output head the head gets its
own int8 copy of the table. This is lossy: greedy outputs can diverge from bf16 after some tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows (batch x positions) use the fused int8 kernel; decode steps fall below it.
_INT8PACK_MAX_ROWS = 16
# Weight elements converted per block for many rows: 4 MB of bf16, small enough to be reused by malloc.
_DEQUANT_BLOCK_ELEMENTS = 1 << 21


class Int8Linear(nn.Module):
    """``y = x @ (weight * scales[:, None]).T`` with an int8 ``weight`` [out, in] and ``scales`` [out]."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear supports bias-free linears only (Llama has no biases)")
        w = linear.weight.detach()
        out = cls(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device)
        absmax = w.abs().amax(dim=1).float()
        scales = (absmax / 127.0).clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero row stays zero
        out.weight = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
        out.scales = scales.to(w.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.scales.dtype:
            return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        if rows <= _INT8PACK_MAX_ROWS:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        else:
            y = self._blockwise_dequant_mm(x2)
        return y.view(*x.shape[:-1], self.out_features)

    def _blockwise_dequant_mm(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, in] -> [rows, out] for many rows (a prefill), which is compute-bound: the int8 kernel is
        built for a few rows, so convert the weight to x's dtype (int8 values are exact in bf16) and use
        its matmul, a block of weight rows at a time. Converting the whole weight at once costs more in
        page faults on the fresh temporary than the matmul itself."""
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        block = max(1, _DEQUANT_BLOCK_ELEMENTS // self.in_features)
        for i in range(0, self.out_features, block):
            y[:, i:i + block] = F.linear(x, self.weight[i:i + block].to(x.dtype))
        return y * self.scales

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, {self.scales.dtype} scales"


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every bias-free ``nn.Linear`` in ``model`` by an ``Int8Linear``, in place; returns ``model``.

    The original bf16 weights of the replaced linears are released unless something else holds them.
    Call it on a model in eval mode, before ``torch.compile``."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and mod.bias is None]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(linear))
    return model
