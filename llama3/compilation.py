"""How the one-token decode step is compiled: torch.compile options per device.

Applied from outside to a built model (``Llama.compile`` uses ``decode_compile_options``); the model
file knows nothing of it.

On CPU a batch-1 decode step is a chain of matrix-vector products, bound by memory bandwidth. Eager
bf16 ``mm`` with one row reads the weights at well under half of this machine's bandwidth; written as
a multiply-and-sum, inductor emits one vectorised reduction loop per weight that streams it at close
to the bandwidth limit, and fuses the bf16 -> fp32 conversion into the loads (fp32 accumulation, as
``mm`` does). The decode step also attends over the whole static cache with a mask; the CPU flash
attention kernel is slow for one query row, so it is decomposed into the plain math (scores, masked
softmax, weighted sum), which inductor fuses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten = torch.ops.aten


SWAP_MAX_ROWS = 16
"""fp32 CPU products of 2 to this many rows run weight-first, ``(W @ x.T).T`` (here and in
``llama3.decode_paths``' swapped path): the GEMM then streams the weight once."""


def _gemv_mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None):
    """``a @ b`` for a [1, K] CPU row as a multiply-and-sum; for 2-16 fp32 rows as ``(b.T @ a.T).T`` (the
    weight as the GEMM's row-major left operand is streamed once, see ``llama3.decode_paths``); anything
    else stays an ``mm``."""
    if out_dtype is not None or a.device.type != "cpu" or a.dim() != 2:
        return NotImplemented
    if a.shape[0] == 1:
        return (a.float().unsqueeze(2) * b.float().unsqueeze(0)).sum(dim=1).to(a.dtype)  # [1, N]
    if a.shape[0] <= SWAP_MAX_ROWS and a.dtype == torch.float32:
        return aten.bmm(b.t().unsqueeze(0), a.t().unsqueeze(0))[0].t()  # bmm: not decomposed again
    return NotImplemented


class _DecompTable(dict):
    """Pickles as a reference to the function that builds it: inductor hashes the table into its cache
    keys, and some stock entries are pybind functions that cannot be pickled (the caches would be
    bypassed, recompiling every run)."""

    def __reduce__(self):
        return (_cpu_decode_decompositions, ())


def _cpu_decode_decompositions() -> dict:
    from torch._decomp.decompositions import scaled_dot_product_flash_attention_for_cpu
    from torch._inductor.decomposition import select_decomp_table

    table = _DecompTable(select_decomp_table())
    table[aten.mm.default] = _gemv_mm
    table[aten._scaled_dot_product_flash_attention_for_cpu.default] = scaled_dot_product_flash_attention_for_cpu
    return table


class _CacheSalt(CustomGraphPass):
    """A no-op post-grad pass whose uuid is this file's hash, so that the caches' keys change when the
    decompositions above do (the table itself is hashed by the name of its builder only)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


def cpu_decode_backend(gm: torch.fx.GraphModule, example_inputs):
    """A torch.compile backend: inductor with the CPU decode decompositions above."""
    from torch._inductor.compile_fx import compile_fx

    # min_chunk_size: loops of fewer elements per thread run on one thread. A decode step is hundreds
    # of small loops (norms, rotary, cache writes) between the big reductions; parallelising those buys
    # nothing and adds an OpenMP barrier each, which costs dearly when the cores are shared.
    return compile_fx(gm, example_inputs, decompositions=_cpu_decode_decompositions(),
                      config_patches={"post_grad_custom_post_pass": _CacheSalt(), "cpp.min_chunk_size": 8192})


def decode_compile_options(device: torch.device | str) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for the decode step on ``device`` (static shapes, one graph)."""
    device = torch.device(device)
    options: dict[str, Any] = {"fullgraph": True, "dynamic": False}
    if device.type == "cpu":
        options["backend"] = cpu_decode_backend
    elif device.type == "cuda":
        # gpt-fast's recipe: CUDA graphs remove the per-kernel launch cost that dominates at batch 1,
        # and coordinate-descent tuning lets the matrix-vector reductions reach HBM bandwidth.
        options["options"] = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    return options
