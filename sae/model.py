"""``SparseAutoencoder``: TopK / BatchTopK / JumpReLU / ReLU SAEs with sparse decoding and losses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS
from .config import SAEConfig
from .io import load_state, read_native, save_sae
from .sparse import SparseCode, gathered_pre, gathered_relu_linear, sparse_decode

INFER_CHUNK_ELEMENTS = 1 << 25
"""Dense pre-activation entries per chunk when encoding without autograd (128 MiB in float32)."""


PROJECT_CHUNK_BYTES = 1 << 20
"""Rows per chunk of ``project_rows_``: about this many bytes of each operand, so its temporaries stay in the
CPU's cache (over the whole [n_latents, d] at once they cost 6x more: 295 ms vs 51 ms at 32768 x 2048)."""


@torch.no_grad()
def project_rows_(g: torch.Tensor, w: torch.Tensor) -> None:
    """g[i] -= (g[i] . w[i] / w[i] . w[i]) w[i] for every row, in place (a gradient made tangent to the
    sphere of each decoder row), chunk by chunk."""
    rows = max(1, PROJECT_CHUNK_BYTES // max(1, w.shape[1] * w.element_size()))
    for i in range(0, g.shape[0], rows):
        gc, wc = g[i:i + rows], w[i:i + rows]
        coef = torch.linalg.vecdot(gc, wc, dim=1) / torch.linalg.vecdot(wc, wc, dim=1).clamp_min(1e-24)
        gc.addcmul_(wc, coef[:, None], value=-1)


class NormStats(NamedTuple):
    """Input normalisation of a batch, x_n = (x - shift) * in_scale; outputs map back by
    y = y_n / out_scale + shift. Tensors broadcast against [N, d] (float32)."""

    shift: torch.Tensor
    in_scale: torch.Tensor
    out_scale: torch.Tensor


@dataclass
class ForwardOutput:
    """What ``SparseAutoencoder.forward`` returns: reconstruction, code and the training losses."""

    x_hat: torch.Tensor
    """Reconstruction in the input's space and shape."""
    code: SparseCode
    """Active latents per token, [..., m]."""
    loss: torch.Tensor
    """mse + aux_coeff * aux_loss + l1_coeff * l1: what to backpropagate."""
    mse: torch.Tensor
    """Mean squared error per element, in the normalised space."""
    aux_loss: torch.Tensor
    """Aux-k loss: normalised MSE of the dead latents' reconstruction of the residual (0 without dead latents)."""
    l1: torch.Tensor
    """Mean over tokens of sum_i h_i * ||W_dec[i]|| (ReLU SAEs; 0 otherwise)."""
    fired: torch.Tensor
    """[n_latents] bool: latents active on at least one token of this batch (for dead-latent tracking)."""
    n_tokens: int


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over activations of width ``cfg.d_model``.

    Weights: ``W_enc`` and ``W_dec`` are both [n_latents, d_model] (one row per latent, so "unit norm
    per latent" is a row norm and a decode gathers rows), ``b_enc`` [n_latents], ``b_pre`` [d_model].

    ``forward(x)`` is the training step's entry point (so that DistributedDataParallel's forward runs) and
    returns a ``ForwardOutput``; ``encode``/``decode``/``reconstruct`` are for inference and analysis.
    """

    def __init__(self, cfg: SAEConfig, *, seed: int | None = 0, device: torch.device | str | None = None):
        """``seed``: orthogonal init with decoder = encoder^T (the seed's), from a private generator;
        None leaves the weights uninitialised, for loaders that fill them."""
        super().__init__()
        self.cfg = cfg
        L, d, dtype = cfg.n_latents, cfg.d_model, cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.empty(L, d, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(L, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(torch.empty(L, d, dtype=dtype, device=device))
        self.b_pre = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))
        # The architecture: which latents a token keeps, its buffers (thresholds) and its penalty.
        self.activation = ACTIVATIONS[cfg.architecture]
        self.activation.register_buffers(self, device)
        # Statistics are float32 whatever the weights are: bf16 would move a Llama Scope scale of 2.197 to 2.188.
        if cfg.skip_connection:
            # [d_out, d_in]: x_hat += x @ W_skip^T, on the raw input (zero at init: the SAE starts without it).
            self.W_skip = nn.Parameter(torch.zeros(d, d, dtype=dtype, device=device))
        if cfg.normalization == "dataset":
            self.register_buffer("norm_shift", torch.zeros(d, dtype=torch.float32, device=device))
            self.register_buffer("norm_in_scale", torch.ones((), dtype=torch.float32, device=device))
            self.register_buffer("norm_out_scale", torch.ones((), dtype=torch.float32, device=device))
        if seed is not None:
            self.reset_parameters(seed)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        w = torch.empty(self.cfg.n_latents, self.cfg.d_model, dtype=torch.float32)
        nn.init.orthogonal_(w, generator=g)
        # With more latents than dimensions the orthogonal matrix has orthonormal columns, not rows.
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)  # encoder = decoder^T in math terms; both are stored row-per-latent
        self.b_enc.zero_()
        self.b_pre.zero_()
        if self.cfg.skip_connection:
            self.W_skip.zero_()

    @torch.no_grad()
    def fit_dataset_norm(self, activations: torch.Tensor | Iterable[torch.Tensor], *, center: bool = False) -> None:
        """Set the "dataset" normalisation from data: scale = sqrt(d_model) / mean ||x - shift|| (Llama
        Scope and Anthropic's April update), shift = the mean when ``center`` else 0."""
        if self.cfg.normalization != "dataset":
            raise ValueError(f"fit_dataset_norm needs normalization='dataset', this SAE has {self.cfg.normalization!r}")
        d = self.cfg.d_model
        if center and not isinstance(activations, torch.Tensor) and iter(activations) is activations:
            raise ValueError("fit_dataset_norm(center=True) reads the data twice: pass a tensor or a list, "
                             "not an iterator")
        mean = torch.zeros(d, dtype=torch.float64)
        if center:
            total, n = torch.zeros(d, dtype=torch.float64), 0
            for x in _batches(activations, d):
                total += x.double().sum(0).cpu()
                n += x.shape[0]
            mean = total / _nonzero(n)
        norm_sum, n = 0.0, 0
        for x in _batches(activations, d):
            norm_sum += float((x.double() - mean.to(x.device)).norm(dim=1).sum())
            n += x.shape[0]
        avg = norm_sum / _nonzero(n)
        if not avg > 0:
            raise ValueError("activations have zero average norm; cannot set a dataset normalisation")
        self.set_dataset_norm(avg, avg, shift=mean if center else None)

    @torch.no_grad()
    def set_dataset_norm(self, avg_norm_in: float, avg_norm_out: float | None = None,
                         shift: torch.Tensor | None = None) -> None:
        """Llama Scope's convention: inputs are multiplied by sqrt(d_model) / avg_norm_in, outputs mapped
        back by avg_norm_out / sqrt(d_model)."""
        if self.cfg.normalization != "dataset":
            raise ValueError(f"set_dataset_norm needs normalization='dataset', this SAE has {self.cfg.normalization!r}")
        avg_norm_out = avg_norm_in if avg_norm_out is None else avg_norm_out
        if not (avg_norm_in > 0 and avg_norm_out > 0):
            raise ValueError(f"average norms must be positive, got in={avg_norm_in} out={avg_norm_out}")
        root = math.sqrt(self.cfg.d_model)
        self.norm_in_scale.fill_(root / avg_norm_in)
        self.norm_out_scale.fill_(root / avg_norm_out)
        self.norm_shift.copy_(torch.zeros(self.cfg.d_model) if shift is None else shift.float())

    @torch.no_grad()
    def init_b_pre_(self, activations: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """b_pre = mean of the *normalised* activations (the seed took it in raw space and used it in the
        standardised space). Accumulates in float64."""
        d = self.cfg.d_model
        total, n = torch.zeros(d, dtype=torch.float64), 0
        for x in _batches(activations, d):
            x = x.to(self.W_enc.device)
            xn, _ = self.normalize(x)
            total += xn.double().sum(0).cpu()
            n += x.shape[0]
        self.b_pre.copy_((total / _nonzero(n)).to(self.b_pre.dtype))

    # ------------------------------------------------------------------ normalisation
    def norm_stats(self, x: torch.Tensor) -> NormStats:
        """Normalisation statistics for a float32 batch [N, d]."""
        kind = self.cfg.normalization
        if kind == "per_token":
            shift = x.mean(-1, keepdim=True)
            scale = 1.0 / (x.std(-1, keepdim=True) + self.cfg.norm_eps)
            return NormStats(shift, scale, scale)
        if kind == "per_token_rms":
            scale = math.sqrt(self.cfg.d_model) / x.norm(dim=-1, keepdim=True)
            return NormStats(x.new_zeros(()), scale, scale)
        if kind == "dataset":
            return NormStats(self.norm_shift, self.norm_in_scale, self.norm_out_scale)
        one = x.new_ones(())
        return NormStats(x.new_zeros(()), one, one)

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, NormStats]:
        """x [N, d] any float dtype -> (x_n in the weights' dtype, stats). With ``code_normalized``,
        ``decode_normalized`` and ``denormalize``, the steps of ``reconstruct`` for callers that need one
        in between (steering edits the code; metrics keep the statistics)."""
        if self.cfg.normalization == "none":
            return x.to(self.W_enc.dtype), self.norm_stats(x.float())
        xf = x.float()
        stats = self.norm_stats(xf)
        return ((xf - stats.shift) * stats.in_scale).to(self.W_enc.dtype), stats

    def denormalize(self, y_n: torch.Tensor, stats: NormStats) -> torch.Tensor:
        """Map a normalised-space output back: y_n / out_scale + shift (float32)."""
        if self.cfg.normalization == "none":
            return y_n.float()
        return y_n.float() / stats.out_scale + stats.shift

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> [N, d_model], with an error that says what is wrong with other shapes."""
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"SAE expects activations with last dimension d_model={self.cfg.d_model}, "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"SAE input must be a floating-point tensor, got {x.dtype}")
        return x.reshape(-1, self.cfg.d_model)

    # ------------------------------------------------------------------ encoder
    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """W_enc (x_n - b_pre) + b_enc for each token: [..., n_latents] in the weights' dtype (dense)."""
        xn, _ = self.normalize(self.flatten(x))
        pre = F.linear(self.centre(xn), self.W_enc, self.b_enc)
        return pre.reshape(*x.shape[:-1], self.cfg.n_latents)

    def centre(self, xn: torch.Tensor) -> torch.Tensor:
        """The encoder's input: normalised x minus b_pre (when the SAE subtracts it)."""
        return xn - self.b_pre if self.cfg.apply_b_pre_to_input else xn

    def decoder_norms(self) -> torch.Tensor:
        """||W_dec[i]|| per latent (float32, no autograd)."""
        return self.W_dec.detach().float().norm(dim=1)

    def _encode(self, xn: torch.Tensor, *, k: int | None, batch_topk: bool, dead_mask: torch.Tensor | None,
                k_aux: int, select_dtype: torch.dtype | None = None) -> tuple[SparseCode, SparseCode | None, float | None]:
        """Normalised [N, d] -> (code, aux code over dead latents or None, batch threshold or None).

        Selection runs on a dense pre-activation matrix computed without autograd (in ``select_dtype``
        when given: then the kept latents' values are recomputed in the weights' dtype); the selected
        values get their gradient from ``gathered_relu_linear``, which touches only the selected rows.
        """
        act = self.activation
        # The aux-k loss trains dead latents to predict what k selected latents missed: k-based selections only.
        k_based = act.uses_k and (batch_topk or not act.selects_over_batch)
        if dead_mask is not None and not k_based:
            raise ValueError(f"the aux-k loss applies to topk/batchtopk SAEs in training, not "
                             f"architecture={self.cfg.architecture!r}" + (" at inference" if act.uses_k else ""))
        xc = self.centre(xn)
        with torch.no_grad():
            if select_dtype is None or select_dtype == self.W_enc.dtype:
                pre = torch.addmm(self.b_enc, xc.detach(), self.W_enc.t()).relu_()  # [N, L], relu(pre)
            else:
                pre = torch.addmm(self.b_enc.to(select_dtype), xc.detach().to(select_dtype),
                                  self.W_enc.to(select_dtype).t()).relu_()
            sel = act.select(self, pre, k, batch_topk)  # thresholds mask pre in place; k-based selections do not
        aux = self._aux_code(xc, pre, dead_mask, k_aux) if dead_mask is not None else None
        sel_values = sel.values
        if pre.dtype != self.W_enc.dtype:  # the kept latents' values again, exactly, in the weights' dtype
            exact = gathered_pre(xc.detach(), self.W_enc, self.b_enc, sel.indices).relu_()
            sel_values = exact * (sel.values > 0).to(exact.dtype)
        values = gathered_relu_linear(xc, self.W_enc, self.b_enc, sel.indices, sel_values)
        values = values * (sel_values > 0).to(values.dtype)  # thresholds and padding; a no-op on the sparse path
        return SparseCode(values, sel.indices), aux, sel.batch_threshold

    def _aux_code(self, xc: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor, k_aux: int) -> SparseCode | None:
        """The top ``k_aux`` relu pre-activations among dead latents, for every token (OpenAI's aux-k).
        No floor on the number of dead latents: one dead latent is enough to train it."""
        if dead_mask.shape != (self.cfg.n_latents,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor [n_latents={self.cfg.n_latents}], "
                             f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
        if k_aux <= 0:
            return None
        dead = dead_mask.to(pre.device).nonzero().squeeze(1)
        if dead.numel() == 0:
            return None
        with torch.no_grad():
            top = pre[:, dead].topk(min(k_aux, dead.numel()), dim=1, sorted=False)
            idx = dead[top.indices]
        values = gathered_relu_linear(xc, self.W_enc, self.b_enc, idx, top.values)
        return SparseCode(values * (top.values > 0).to(values.dtype), idx)

    def code_normalized(self, xn: torch.Tensor, k: int | None = None) -> SparseCode:
        """Inference encode of normalised [N, d]. Without autograd, tokens go through in chunks so the
        dense pre-activations stay near INFER_CHUNK_ELEMENTS entries (a 2048-token prompt with 65k
        latents would otherwise hold 0.5 GiB of them per row of the batch)."""
        rows = max(1, INFER_CHUNK_ELEMENTS // self.cfg.n_latents)
        building_graph = torch.is_grad_enabled() and (xn.requires_grad or self.W_enc.requires_grad)
        if building_graph or xn.shape[0] <= rows:
            return self._encode(xn, k=k, batch_topk=False, dead_mask=None, k_aux=0)[0]
        codes = [self._encode(part, k=k, batch_topk=False, dead_mask=None, k_aux=0)[0] for part in xn.split(rows)]
        return _cat_codes(codes)

    def encode(self, x: torch.Tensor, *, sparse: bool = False, k: int | None = None,
               scale: str = "native") -> torch.Tensor | SparseCode:
        """Latent activations of ``x`` [..., d_model].

        Returns the dense code [..., n_latents] (zeros where a latent is off), or with ``sparse=True`` a
        ``SparseCode`` of [..., m] values and indices. BatchTopK SAEs use their learned threshold here.
        Differentiable with respect to x and the weights.

        scale: "native" -- the SAE's own codes; for a loaded SAE these are what its library's ``encode``
        returns (``cfg.source["code_scale"]`` says which); "decoder_norm" -- the norm of each latent's
        contribution to the reconstruction, in the activations' own units (codes times ||W_dec[i]||, divided
        by the output normalisation's scale): comparable across SAEs, and what SAELens reports for an SAE of
        ours ranked by decoder norm once exported.
        """
        if scale not in ("native", "decoder_norm"):
            raise ValueError(f"scale={scale!r} must be 'native' or 'decoder_norm'")
        flat = self.flatten(x)
        xn, stats = self.normalize(flat)
        code = self.code_normalized(xn, k=k)
        if scale == "decoder_norm":
            # ||h_i W_dec[i]|| mapped out of the normalised space: the latent's share of x_hat, in x's units.
            f = self.W_dec.float().norm(dim=1)[code.indices]
            if self.cfg.normalization != "none":
                f = f / stats.out_scale
            code = SparseCode(code.values * f.to(code.values.dtype), code.indices)
        code = code.unflatten(x.shape[:-1])
        return code if sparse else code.to_dense(self.cfg.n_latents)

    # ------------------------------------------------------------------ decoder
    def decode(self, h: torch.Tensor | SparseCode, stats: NormStats | None = None) -> torch.Tensor:
        """Reconstruction from a dense code [..., n_latents] or a ``SparseCode``, in the input space
        (float32). Per-token normalisation needs the statistics of the input: ``stats=sae.norm_stats(x)``."""
        if stats is None:
            if self.cfg.normalization == "per_token":
                raise ValueError("this SAE normalises each token by its own mean and std, so decode needs "
                                 "them: pass stats=sae.norm_stats(x.float()) or use sae.reconstruct(x)")
            # "none" and "dataset" statistics do not depend on the batch.
            stats = self.norm_stats(self.b_pre.new_zeros(1, self.cfg.d_model, dtype=torch.float32))
        code = h if isinstance(h, SparseCode) else _dense_to_sparse(h, self.cfg.n_latents)
        leading = code.values.shape[:-1]
        flat = code.flatten()
        y = self.decode_normalized(flat)
        return self.denormalize(y, stats).reshape(*leading, self.cfg.d_model)

    def decode_normalized(self, code: SparseCode, bias: bool = True) -> torch.Tensor:
        """W_dec^T h (+ b_pre) in the normalised space, touching only the active latents' rows."""
        y = sparse_decode(code.values.to(self.W_dec.dtype), code.indices, self.W_dec)
        return y + self.b_pre if bias else y

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """The skip connection's term W_skip x for raw inputs [N, d] (float32), or None without one."""
        if not self.cfg.skip_connection:
            return None
        return F.linear(x.to(self.W_skip.dtype), self.W_skip).float()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) (plus the skip term, if any) in x's shape and dtype. For a transcoder this is
        the predicted MLP output for MLP input x."""
        y, _ = self.reconstruct_with_code(self.flatten(x))
        return y.to(x.dtype).reshape(x.shape)

    def reconstruct_with_code(self, flat: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        """Rows [N, d] -> (their reconstruction with the skip term, float32 [N, d]; their code)."""
        xn, stats = self.normalize(flat)
        code = self.code_normalized(xn)
        y = self.denormalize(self.decode_normalized(code), stats)
        s = self.skip(flat)
        return (y if s is None else y + s), code

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, *, target: torch.Tensor | None = None, k: int | None = None,
                dead_mask: torch.Tensor | None = None, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                l1_coeff: float = 0.0, select_dtype: torch.dtype | None = None) -> ForwardOutput:
        """One training forward: encode, decode, losses in the normalised space.

        select_dtype: compute the dense encoder matmul that picks each token's latents (the step's floor)
        in this dtype, e.g. bfloat16 where bf16 matrix units make it several times faster; the kept
        latents' values, the decoder, the losses and every gradient stay in the weights' dtype. Near-ties
        may then pick other latents than an fp32 selection would.

        target: what to reconstruct, x's shape (a transcoder's MLP output); default x itself.
        k: override the SAE's k (k-annealing; see ``sae.training.KSchedule``). dead_mask: [n_latents]
        bool, latents to train with the aux-k loss (``DeadLatentTracker.dead_mask``). k_aux: dead latents
        used per token (default d_model // 2). BatchTopK selects over the whole batch in training mode
        and updates its inference threshold; in eval mode it uses the threshold.
        """
        flat = self.flatten(x)
        xn, stats = self.normalize(flat)
        k_aux = self.cfg.d_model // 2 if k_aux is None else int(k_aux)
        batch_topk = self.activation.selects_over_batch and self.training
        code, aux_code, batch_threshold = self._encode(xn, k=k, batch_topk=batch_topk, dead_mask=dead_mask,
                                                       k_aux=k_aux, select_dtype=select_dtype)
        if batch_threshold is not None:
            self._update_batch_threshold(batch_threshold)
        x_hat_n = self.decode_normalized(code)
        y = flat if target is None else self.flatten(target)
        if y.shape != flat.shape:
            raise ValueError(f"target has shape {tuple(target.shape)}, the input {tuple(x.shape)}")
        s = self.skip(flat)
        if s is not None:  # the skip term is learned in the output's normalised space like the rest
            x_hat_n = x_hat_n + s * stats.out_scale if self.cfg.normalization != "none" else x_hat_n + s
        target = (y.float() - stats.shift) * stats.out_scale
        mse = (x_hat_n.float() - target).pow(2).mean()
        zero = mse.new_zeros(())
        aux_loss = zero
        if aux_code is not None:
            residual = (target - x_hat_n.float()).detach()
            e_hat = self.decode_normalized(aux_code, bias=False).float()  # the residual has no b_pre in it
            denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
            aux_loss = (e_hat - residual).pow(2).sum() / denom
        penalty = self.activation.penalty(self, code.values, code.indices)
        l1 = zero if penalty is None else penalty
        loss = mse + aux_coeff * aux_loss + l1_coeff * l1
        fired = torch.zeros(self.cfg.n_latents, dtype=torch.bool, device=flat.device)
        fired[code.indices[code.values > 0]] = True
        x_hat = self.denormalize(x_hat_n, stats).to(x.dtype).reshape(x.shape)
        return ForwardOutput(x_hat=x_hat, code=code.unflatten(x.shape[:-1]), loss=loss, mse=mse,
                             aux_loss=aux_loss, l1=l1, fired=fired, n_tokens=flat.shape[0])

    @torch.no_grad()
    def _update_batch_threshold(self, batch_threshold: float, momentum: float = 0.99) -> None:
        # The smallest activation BatchTopK kept, averaged over training (Bussmann et al.); stored per
        # latent so inference is a JumpReLU. With decoder-norm ranking the score threshold maps to
        # threshold / ||W_dec[i]|| in activation units.
        t = torch.full_like(self.threshold, batch_threshold)
        if self.cfg.rank_by_decoder_norm:
            t = t / self.decoder_norms().clamp_min(1e-12).to(t.device)
        n = int(self.threshold_updates)
        # Bias-corrected average: exact mean for the first 1/(1-momentum) steps, then an EMA.
        beta = max(1.0 - momentum, 1.0 / (n + 1))
        self.threshold.mul_(1 - beta).add_(t, alpha=beta)
        self.threshold_updates += 1

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every latent's decoder vector (a row of W_dec) to unit norm. Call after each optimizer step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def fold_decoder_norms_(self) -> None:
        """Give every decoder row unit norm: h_i W_dec_i = (n_i h_i)(W_dec_i / n_i), so latent i's encoder row,
        bias and threshold are scaled by n_i. Exact for thresholded architectures and for TopK ranked by
        decoder norm; a TopK SAE ranked by the code alone then ranks by n_i h_i, so with norms far from 1 it
        may keep other latents (after EMA, whose rows are within a fraction of a percent of unit, rarely)."""
        norms = self.W_dec.float().norm(dim=1).clamp_min(1e-12)
        self.W_dec.copy_((self.W_dec.float() / norms[:, None]).to(self.W_dec.dtype))
        self.W_enc.copy_((self.W_enc.float() * norms[:, None]).to(self.W_enc.dtype))
        self.b_enc.copy_((self.b_enc.float() * norms).to(self.b_enc.dtype))
        if self.activation.learns_threshold:
            self.threshold.mul_(norms.to(self.threshold.device))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from each latent's decoder gradient its component along that latent's decoder vector,
        so a step moves along the unit sphere. Call between backward and the optimizer step."""
        if self.W_dec.grad is not None:
            project_rows_(self.W_dec.grad, self.W_dec)

    # ------------------------------------------------------------------ I/O and injection
    def save(self, path: str | Path) -> None:
        """Write ``path/config.json`` and ``path/sae.safetensors`` (this project's format)."""
        save_sae(self, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> "SparseAutoencoder":
        """A directory written by ``save``; every tensor comes back bit for bit."""
        cfg, tensors, weights = read_native(path)
        sae = cls(cfg, seed=None, device=device)
        load_state(sae, tensors, where=str(weights))
        return sae

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        return (f"d_model={c.d_model}, n_latents={c.n_latents}, architecture={c.architecture}{k}, "
                f"normalization={c.normalization}, site={c.site}")


# --------------------------------------------------------------------------- helpers
def _cat_codes(codes: list[SparseCode]) -> SparseCode:
    """Stack codes of consecutive token chunks, padding each to the widest with zeros at index 0."""
    m = max(c.values.shape[1] for c in codes)
    values = torch.cat([F.pad(c.values, (0, m - c.values.shape[1])) for c in codes])
    indices = torch.cat([F.pad(c.indices, (0, m - c.indices.shape[1])) for c in codes])
    return SparseCode(values, indices)


def _dense_to_sparse(h: torch.Tensor, n_latents: int) -> SparseCode:
    if h.shape[-1] != n_latents:
        raise ValueError(f"dense code must have last dimension n_latents={n_latents}, got {tuple(h.shape)}")
    flat = h.reshape(-1, n_latents)
    m = int((flat != 0).sum(1).max()) if flat.shape[0] else 0
    idx = flat.detach().abs().topk(m, dim=1, sorted=False).indices
    return SparseCode(flat.gather(1, idx), idx).unflatten(h.shape[:-1])


def _batches(activations: torch.Tensor | Iterable[torch.Tensor], d: int) -> Iterable[torch.Tensor]:
    items = [activations] if isinstance(activations, torch.Tensor) else activations
    for x in items:
        if x.shape[-1] != d:
            raise ValueError(f"activations must have last dimension d_model={d}, got {tuple(x.shape)}")
        yield x.reshape(-1, d)


def _nonzero(n: int) -> int:
    if n == 0:
        raise ValueError("no activations were given")
    return n
