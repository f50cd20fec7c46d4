"""Functions for ``Transformer(sae_layer_forward_fn={site: f})``: reconstruct, and error-preserving steering.

* ``reconstruct_fn(sae)``: x -> x_hat (the seed's behaviour: the model then sees only the SAE's picture).
* ``steer_fn(sae, edits)``: x -> x + decode(h_edited) - decode(h) (Goodfire's error-preserving
  intervention): the reconstruction error is kept, so without edits the model is untouched.

Edits act on the activations after the activation function (the seed added its ``h_bias`` before TopK,
which could silently drop the steered latent). Each edit may apply to some rows of the batch only, so
one batched forward can serve several users or several steering settings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from llama3_sae.sites import parse_site, site_name

from .conditions import Condition
from .model import SparseAutoencoder

SaeFn = Callable[[torch.Tensor], torch.Tensor]
OPS = ("add", "set", "clamp", "zero")


# Edits beyond this are refused: fp16 overflows at 65,504, and no latent needs more than a few hundred.
MAX_EDIT_VALUE = 1e4


@dataclass(frozen=True)
class Edit:
    """One change to one latent's activation h[latent]:

    add: h + value; set: value; clamp: clamp(h, min, max); zero: 0.
    rows: batch rows it applies to (None: every row). Edits apply in the order given.
    when: a ``Condition`` on the unedited activations (``12>0.75``): the edit applies only at the
    positions where it holds (None: everywhere).
    """

    latent: int
    op: str = "add"
    value: float = 0.0
    min: float | None = None
    max: float | None = None
    rows: tuple[int, ...] | None = None
    when: Condition | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.latent, int) or isinstance(self.latent, bool) or self.latent < 0:
            raise ValueError(f"edit latent must be a non-negative int, got {self.latent!r}")
        if self.op not in OPS:
            raise ValueError(f"edit op {self.op!r} is not one of {OPS}")
        if self.op == "clamp" and self.min is None and self.max is None:
            raise ValueError(f"clamp edit on latent {self.latent} needs min and/or max")
        if self.op == "clamp" and self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"clamp edit on latent {self.latent}: min={self.min} > max={self.max}")
        if self.op != "clamp" and (self.min is not None or self.max is not None):
            raise ValueError(f"min/max belong to clamp edits, not {self.op!r}")
        for name in ("value", "min", "max"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and abs(v) <= MAX_EDIT_VALUE):
                raise ValueError(f"edit on latent {self.latent}: {name}={v!r} must be a finite number within "
                                 f"+-{MAX_EDIT_VALUE:g} (latent activations are of order 1-100; larger values "
                                 "overflow the activations' dtype)")
        if self.rows is not None:
            rows = tuple(self.rows)
            if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in rows):
                raise ValueError(f"edit rows must be non-negative ints, got {self.rows!r}")
            object.__setattr__(self, "rows", rows)

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """This edit applied to the latent's activations ``values``."""
        if self.op == "add":
            return values + self.value
        if self.op == "set":
            return torch.full_like(values, self.value)
        if self.op == "zero":
            return torch.zeros_like(values)
        return values.clamp(min=self.min, max=self.max)

    @classmethod
    def parse(cls, spec: str, rows: Sequence[int] | None = None, when: Condition | None = None) -> "Edit":
        """Command-line form: ``896=20`` (add 20, the seed's steering), ``896:add=20``, ``896:set=5``,
        ``896:zero``, ``896:clamp=0..8`` (either bound may be left out: ``896:clamp=..8``)."""
        m = _SPEC.match(spec.strip())
        if not m:
            raise ValueError(f"cannot parse steering edit {spec!r}; use LATENT=VALUE, LATENT:add=VALUE, "
                             "LATENT:set=VALUE, LATENT:zero or LATENT:clamp=MIN..MAX")
        latent, op, arg = int(m["latent"]), m["op"] or "add", m["arg"]
        rows = tuple(rows) if rows is not None else None
        try:
            if op == "zero":
                if arg is not None:
                    raise ValueError
                return cls(latent, "zero", rows=rows, when=when)
            if arg is None:
                raise ValueError
            if op == "clamp":
                lo, sep, hi = arg.partition("..")
                if not sep:
                    raise ValueError
                return cls(latent, "clamp", min=float(lo) if lo else None, max=float(hi) if hi else None, rows=rows,
                           when=when)
            return cls(latent, op, value=float(arg), rows=rows, when=when)
        except ValueError as e:
            if str(e):
                raise
            raise ValueError(f"bad value in steering edit {spec!r}") from None


_SPEC = re.compile(r"^(?P<latent>\d+)(?::(?P<op>add|set|clamp|zero))?(?:=(?P<arg>\S+))?$")


def reconstruct_fn(sae: SparseAutoencoder) -> SaeFn:
    """x [..., d] -> the SAE's reconstruction, in x's dtype."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return sae.reconstruct(x)

    return fn


def zero_fn() -> SaeFn:
    """x -> 0: the zero-ablation baseline for fidelity."""
    return torch.zeros_like


def steer_fn(sae: SparseAutoencoder, edits: Sequence[Edit] = ()) -> SaeFn:
    """x [B, T, d] (or [B, d]) -> x + decode(h_edited) - decode(h), in x's dtype. For a transcoder,
    (mlp_in, mlp_out) -> mlp_out + decode(h_edited) - decode(h), h the code of mlp_in.

    With no edits the function returns x itself. Rows no edit applies to come back bit for bit too.
    Only the edited latents' decoder rows are touched: decode is linear, so
    decode(h_edited) - decode(h) = sum over edited latents i of (h_edited_i - h_i) W_dec[i], mapped
    out of the normalised space.
    """
    edits = tuple(edits)
    for e in edits:
        if not isinstance(e, Edit):
            raise ValueError(f"edits must be sae.Edit objects, got {type(e).__name__}")
        for latent in [e.latent, *(e.when.latents if e.when is not None else [])]:
            if latent >= sae.cfg.n_latents:
                raise ValueError(f"edit on latent {e.latent} reads latent {latent}, but this SAE has latents "
                                 f"0..{sae.cfg.n_latents - 1}")
    if not edits:
        return _keep_mlp if sae.cfg.is_transcoder else _identity
    edited = sorted({e.latent for e in edits})
    # The columns of h: the edited latents, then the ones only conditions read.
    latents = edited + sorted({lat for e in edits if e.when is not None for lat in e.when.latents} - set(edited))
    column = {latent: j for j, latent in enumerate(latents)}
    # Adding to a latent moves the output by that latent's decoder row alone, whatever the code is.
    additive = all(e.op == "add" and e.when is None for e in edits)

    def fn(x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        # base: what the edit is added to; x itself for an SAE, the MLP's own output for a transcoder.
        base = x if base is None else base
        if x.dim() < 2:
            raise ValueError(f"steering expects [batch, ..., d_model], got shape {tuple(x.shape)}")
        B = x.shape[0]
        for e in edits:
            if e.rows is not None and max(e.rows, default=-1) >= B:
                raise ValueError(f"edit on latent {e.latent} names row {max(e.rows)}, but the batch has {B} rows")
        flat = sae.flatten(x)
        lat = torch.tensor(latents, device=x.device)
        if additive:
            # decode(h + v e_i) - decode(h) = v W_dec[i] whatever h is: no encoder pass at all.
            stats = sae.norm_stats(flat.float())
            h = torch.zeros(flat.shape[0], len(latents), device=x.device)
        elif sae.activation.per_latent:
            # JumpReLU / ReLU / BatchTopK at inference: each latent's code depends on its own encoder row
            # only, so the edited and condition latents' codes need E rows of W_enc, not all of them.
            xn, stats = sae.normalize(flat)
            pre = torch.addmm(sae.b_enc[lat], sae.centre(xn), sae.W_enc[lat].t()).relu_()
            h = sae.activation.columns(sae, pre.float(), lat)
        else:
            xn, stats = sae.normalize(flat)
            code = sae.code_normalized(xn)  # TopK: a latent's code depends on its rank among all of them
            # Current activations of the edited (and condition) latents, h [N, E].
            hit = code.indices[:, :, None] == lat  # [N, m, E]
            h = (code.values.float()[:, :, None] * hit).sum(1)
        new = h.clone()
        original = lambda latent: h[:, column[latent]]  # noqa: E731 (what conditions read: the unedited code)
        row_of_token = torch.arange(B, device=x.device).repeat_interleave(flat.shape[0] // B)
        for e in edits:
            j = column[e.latent]
            if e.rows is None:
                sel = torch.ones_like(row_of_token, dtype=torch.bool)
            else:
                sel = torch.isin(row_of_token, torch.tensor(e.rows, device=x.device))
            if e.when is not None:
                sel = sel & e.when.holds(original)
            cur = new[:, j]
            new[:, j] = torch.where(sel, e.apply(cur), cur)
        delta_h = (new - h)[:, :len(edited)]  # [N, E]; condition-only columns never change
        changed = (delta_h != 0).any(1)  # no host sync here: generation calls this every step
        w = sae.W_dec[lat[:len(edited)]].float()  # [E, d]
        delta_n = delta_h @ w  # normalised space; the bias cancels in the difference
        delta = delta_n / stats.out_scale if sae.cfg.normalization != "none" else delta_n
        flat_base = base.reshape(flat.shape)
        out = flat_base.float() + delta
        # Untouched tokens keep their exact input (x + 0 rounds back to x, but say so explicitly).
        out = torch.where(changed[:, None], out.to(base.dtype), flat_base)
        return out.reshape(base.shape)

    if sae.cfg.is_transcoder:
        # At an L{L}TC site the model calls fn(mlp_in, mlp_out): the MLP still runs and the edits move its output.
        fn.keeps_mlp = True  # type: ignore[attr-defined]
    return fn


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _keep_mlp(x: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
    return mlp_out


_keep_mlp.keeps_mlp = True  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- injection into llama3
def bind_to_model(sae: SparseAutoencoder, model: Any) -> SparseAutoencoder:
    """Fold what an SAE needs from the model it runs in, once: an SAE trained on TransformerLens's
    ``ln1/ln2.hook_normalized`` (before the RMSNorm weight g; SAELens, Llama Scope transcoders) reads our
    attn_in / mlp_in divided by g, so its encoder (and skip) columns are divided by g; an SAE (not a
    transcoder, whose output is the MLP's) also reconstructs that point, so its decoder and bias are
    multiplied by g, and a dataset normalisation's shift mu becomes g mu. Other SAEs pass through."""
    point = sae.cfg.source.get("input_before_norm_weight")
    if not point or sae.cfg.source.get("norm_weight_folded"):
        return sae

    if sae.cfg.site is None:
        raise ValueError("this SAE reads a normalised input before the norm weight but names no site; pass site=...")
    layer = parse_site(sae.cfg.site).layer
    if layer >= len(model.layers):
        raise ValueError(f"SAE site {sae.cfg.site} is past the model's last layer ({len(model.layers) - 1})")
    block = model.layers[layer]
    g = (block.attention_norm if point == "attn_in" else block.ffn_norm).weight.detach().float()
    if g.shape[0] != sae.cfg.d_model:
        raise ValueError(f"SAE reads d_model={sae.cfg.d_model} activations but the model's width is {g.shape[0]}")
    if sae.cfg.apply_b_pre_to_input:
        raise ValueError("this SAE subtracts its decoder bias from an input taken before the norm weight; that cannot "
                         "be moved after the weight")
    if sae.cfg.normalization in ("per_token", "per_token_rms"):
        raise ValueError(f"this SAE normalises each token ({sae.cfg.normalization}) of an input taken before the norm "
                         "weight; the statistics of x / g cannot be had from x")
    if sae.cfg.is_transcoder and sae.cfg.normalization == "dataset" and bool(sae.norm_shift.abs().max() > 0):
        raise ValueError("this transcoder centres an input taken before the norm weight with a shift it also adds to "
                         "its output; the two cannot be separated")
    if bool((g == 0).any()):
        raise ValueError(f"the model's {point} norm weight has zeros at layer {layer}; the SAE's input cannot be recovered")
    with torch.no_grad():
        inv = (1.0 / g).to(sae.W_enc.device)
        sae.W_enc.copy_((sae.W_enc.float() * inv).to(sae.W_enc.dtype))
        if sae.cfg.skip_connection:
            sae.W_skip.copy_((sae.W_skip.float() * inv).to(sae.W_skip.dtype))
        if not sae.cfg.is_transcoder:  # it reconstructs x / g: our point is g times that
            gd = g.to(sae.W_dec.device)
            sae.W_dec.copy_((sae.W_dec.float() * gd).to(sae.W_dec.dtype))
            sae.b_pre.copy_((sae.b_pre.float() * gd).to(sae.b_pre.dtype))
            if sae.cfg.normalization == "dataset":  # (x / g - mu) s = (x - g mu) s / g, and g (y + mu) = g y + g mu
                sae.norm_shift.mul_(g.to(sae.norm_shift.device))
    sae.cfg = sae.cfg.replace(source={**sae.cfg.source, "norm_weight_folded": True})
    return sae


def check_injection(sae: SparseAutoencoder, params: Any, site: Any = None, *, require_bound: bool = True):
    """The site an SAE goes to in a model with ``params`` (a ModelArgs), or a ValueError that says why it
    cannot: no site known, a layer the model does not have, a different width, or (with ``require_bound``)
    an input convention that ``bind_to_model`` has not folded yet."""

    if require_bound and sae.cfg.source.get("input_before_norm_weight") and not sae.cfg.source.get("norm_weight_folded"):
        raise ValueError("this SAE reads TransformerLens's normalised input, before the RMSNorm weight: call "
                         "sae.steering.bind_to_model(sae, model) first (the apps do)")
    chosen = site if site is not None else sae.cfg.site
    if chosen is None:
        raise ValueError("this SAE does not record which site it reads; pass site=... (e.g. 'L15R')")
    parsed = parse_site(chosen)
    if sae.cfg.site is not None and site is not None and site_name(parsed) != sae.cfg.site:
        raise ValueError(f"this SAE was trained at {sae.cfg.site}, not {site_name(parsed)}; inject it where it "
                         "was trained (or change sae.cfg.site if you really mean to move it)")
    if parsed.layer >= params.n_layers:
        raise ValueError(f"SAE site {site_name(parsed)} is past the model's last layer ({params.n_layers - 1})")
    if params.dim != sae.cfg.d_model:
        raise ValueError(f"SAE reads d_model={sae.cfg.d_model} activations but the model's width is {params.dim}"
                         f" (SAE model_name={sae.cfg.model_name!r})")
    return parsed


def sae_hooks(sae: SparseAutoencoder, model: Any, *, mode: str = "steer", edits: Sequence[Edit] = (),
              site: Any = None) -> dict:
    """``{site: f}`` for ``Transformer(sae_layer_forward_fn=...)`` / ``model.set_hooks(...)``, checked
    against ``model.params`` (a Transformer or a ModelArgs). mode: "steer", "reconstruct" or "zero"."""
    params = getattr(model, "params", model)
    if hasattr(model, "layers"):
        bind_to_model(sae, model)
    target = check_injection(sae, params, site)
    if mode == "steer":
        fn = steer_fn(sae, edits)
    elif mode in ("reconstruct", "zero"):
        if edits:
            raise ValueError(f"edits apply to mode='steer', not {mode!r}")
        fn = reconstruct_fn(sae) if mode == "reconstruct" else zero_fn()
    else:
        raise ValueError(f"mode={mode!r} must be 'steer', 'reconstruct' or 'zero'")
    return {target: fn}
