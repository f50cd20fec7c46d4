"""``llama3-sae inspect-sae``: what ``load_sae`` understood about an SAE file, so a download can be checked
before it is trusted -- layout, architecture, site, model, normalisation and its factors, the space a
threshold applies in, the code scale -- and, with ``--store``, its L0 and explained variance on real
activations."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capture.store import ActivationStore
from llama3.checkpoint import load_model, resolve_checkpoint
from llama3.model import parse_site
from sae import SparseAutoencoder, bind_to_model, load_sae
from sae.metrics import evaluate_reconstruction

_POINT_WORDS = {"resid_pre": "the residual stream entering block", "attn_in": "the attention input (after the norm "
                "weight) of block", "attn_out": "the attention output of block", "resid_mid": "the residual stream "
                "between attention and MLP of block", "mlp_in": "the MLP input (after the norm weight) of block",
                "mlp_out": "the MLP output of block", "resid_post": "the residual stream leaving block"}


@dataclass
class InspectConfig:
    """``llama3-sae inspect-sae``: what the loader understood about an SAE, and how it does on activations."""

    sae: Path
    """The SAE: a directory (this project, SAELens, Llama Scope release or llamascopium, sparsify) or a
    Goodfire .pth file."""
    site: str | None = None
    """Hook site, for files that do not name theirs (e.g. L19R); overrides a site guessed from a file name."""
    format: str | None = None
    """Force the layout instead of detecting it: llama3-sae, sae_lens, llama_scope, llamascopium, sparsify,
    goodfire."""
    store: Path | None = None
    """An activation store captured at the SAE's site (for a transcoder: at its MLP input, L{L}MI): measure L0,
    explained variance and dead latents on its rows."""
    target_store: Path | None = None
    """For a transcoder: the store of the MLP output (L{L}M) captured with --store's rows."""
    ckpt_dir: Path | None = None
    """Model checkpoint, needed with --store only for SAEs trained on TransformerLens's normalised inputs
    (ln1/ln2.hook_normalized): the model's norm weight is folded into them. Default: the built-in model."""
    max_rows: int = 65536
    """Rows of --store to measure on (its first shards)."""
    json: bool = False
    """Print the report as JSON instead of text."""

    def __post_init__(self) -> None:
        self.sae = Path(self.sae)
        for name in ("store", "target_store", "ckpt_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if self.max_rows < 1:
            raise ValueError(f"--max-rows must be >= 1, got {self.max_rows}")
        if self.target_store is not None and self.store is None:
            raise ValueError("--target-store goes with --store (the MLP input rows it matches)")


def describe_site(site: str | None) -> str:
    if site is None:
        return "unknown (the file names none; pass --site)"
    s = parse_site(site)
    if s.point == "mlp":
        return f"{site}: a transcoder of block {s.layer}'s MLP (reads mlp_in, predicts mlp_out)"
    return f"{site}: {_POINT_WORDS[s.point]} {s.layer}"


def _summary(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().float().flatten()
    return {"min": float(t.min()), "median": float(t.median()), "max": float(t.max())}


def understood(sae: SparseAutoencoder, path: str | Path | None = None) -> dict[str, Any]:
    """What the loader made of the file at ``path``, as plain data."""
    c, src = sae.cfg, dict(sae.cfg.source)
    norm: dict[str, Any] = {"kind": c.normalization}
    if c.normalization == "dataset":
        norm.update(in_scale=float(sae.norm_in_scale), out_scale=float(sae.norm_out_scale),
                    shifted=bool(sae.norm_shift.abs().max() > 0))
    elif c.normalization == "per_token":
        norm["formula"] = f"(x - mean) / (std + {c.norm_eps:g}) per token"
    elif c.normalization == "per_token_rms":
        norm["formula"] = "x * sqrt(d_model) / ||x|| per token"
    if src.get("norm_factors_folded"):
        norm["folded_into_weights"] = src["norm_factors_folded"]
    out: dict[str, Any] = {
        "path": str(src.get("path") or path or ""), "layout": src.get("format", "llama3-sae"), "weights": src.get("weights"),
        "library_architecture": src.get("architecture"),
        "architecture": c.architecture, "k": c.k, "d_model": c.d_model, "n_latents": c.n_latents, "dtype": c.dtype,
        "site": c.site, "site_meaning": describe_site(c.site), "transcoder": c.is_transcoder,
        "hooks": {k: src[k] for k in ("hook_name", "hook_name_out", "hook_point_in", "hook_point_out", "hookpoint")
                  if src.get(k)},
        "model_name": c.model_name, "prepend_bos": c.prepend_bos,
        "normalization": norm,
        "input_bias_subtracted": c.apply_b_pre_to_input, "skip_connection": c.skip_connection,
        "rank_by_decoder_norm": c.rank_by_decoder_norm,
        "decoder_norms": _summary(sae.W_dec.norm(dim=1)),
        "code_scale": src.get("code_scale", "this project's codes (relu pre-activations in the normalised space)"),
        "notes": [],
    }
    if sae.activation.learns_threshold:
        out["threshold"] = {**_summary(sae.threshold),
                            "space": src.get("threshold_space", "the code, in the normalised space")}
    if src.get("inferred_from_file_name"):
        out["notes"].append(f"{' and '.join(src['inferred_from_file_name'])} inferred from the file name")
    if src.get("input_before_norm_weight"):
        point = src["input_before_norm_weight"]
        out["notes"].append(f"trained on TransformerLens's normalised input (before the RMSNorm weight); {point} "
                            "here is after it, so the model's norm weight is folded in when it is loaded with one"
                            + (" (done)" if src.get("norm_weight_folded") else ""))
    if src.get("format") == "llamascopium" and src.get("norm_activation") == "dataset-wise":
        out["notes"].append("llamascopium: a file whose trainer folded the norms while its config still says "
                            "dataset-wise cannot be told apart; if L0 on --store is far off, this is why")
    return out


def measure(sae: SparseAutoencoder, cfg: InspectConfig) -> dict[str, Any]:
    """L0 / explained variance / dead fraction on the first ``max_rows`` rows of ``cfg.store``."""
    store = ActivationStore(cfg.store)
    target = ActivationStore(cfg.target_store) if cfg.target_store is not None else None
    notes = []
    if sae.cfg.is_transcoder and target is None:
        raise ValueError(f"{sae.cfg.site} is a transcoder: give the MLP input store as --store and the MLP output "
                         "store captured with it as --target-store (capture --sites L{L}TC writes both)")
    if store.d_model != sae.cfg.d_model:
        raise ValueError(f"{cfg.store} holds d_model={store.d_model} activations; the SAE reads {sae.cfg.d_model}")
    expected = sae.cfg.input_site
    if expected is not None and store.site != expected:
        notes.append(f"the store was captured at {store.site}, the SAE reads {expected}")
    if target is not None:
        store.check_same_rows(target)

    def batches():
        left = cfg.max_rows
        for i in range(len(store.shards)):
            if left <= 0:
                return
            x = store.read_shard(i)["activations"][:left].float()
            y = target.read_shard(i)["activations"][:left].float() if target is not None else None
            left -= x.shape[0]
            yield (x, y) if y is not None else x

    report = evaluate_reconstruction(sae, batches())
    return {"store": str(cfg.store), "rows": report.n_tokens, "l0": report.l0,
            "explained_variance": report.explained_variance, "fvu": report.fvu,
            "dead_fraction": report.dead_fraction, "notes": notes}


def run_inspect(cfg: InspectConfig) -> dict[str, Any]:
    sae = load_sae(cfg.sae, format=cfg.format, site=cfg.site).eval()
    if cfg.store is not None and sae.cfg.source.get("input_before_norm_weight"):
        # Measuring on our activations needs the model's norm weight folded in (the report then says so).
        bind_to_model(sae, load_model(resolve_checkpoint(cfg.ckpt_dir), device="cpu", dtype=torch.float32))
    report = understood(sae, cfg.sae)
    if cfg.store is not None:
        report["measured"] = measure(sae, cfg)
    return report


def format_report(r: dict[str, Any]) -> str:
    def fmt(x: Any) -> str:
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = [f"SAE            {r['path']}",
             f"layout         {r['layout']}" + (f" (architecture {r['library_architecture']!r})"
                                                if r.get("library_architecture") else "")
             + (f", weights {r['weights']}" if r.get("weights") else ""),
             f"computes as    {r['architecture']}" + (f", k={r['k']}" if r["k"] else "")
             + f"; {r['n_latents']:,} latents over d_model={r['d_model']}, {r['dtype']}"
             + ("; plus a skip connection" if r["skip_connection"] else ""),
             f"site           {r['site_meaning']}"]
    if r["hooks"]:
        lines.append("hooks          " + ", ".join(f"{k}={v}" for k, v in r["hooks"].items()))
    lines.append(f"model          {r['model_name'] or 'unknown'}"
                 + ("" if r["prepend_bos"] is None else f"; text {'with' if r['prepend_bos'] else 'without'} BOS"))
    n = r["normalization"]
    desc = n["kind"]
    if n["kind"] == "dataset":
        desc += f": inputs x {n['in_scale']:.4g}, outputs / {n['out_scale']:.4g}" + (" (centred)" if n["shifted"] else "")
    elif "formula" in n:
        desc += f": {n['formula']}"
    if n.get("folded_into_weights"):
        desc += " (the file's dataset-wise factors " + ", ".join(
            f"{k} {v:.4g}" for k, v in n["folded_into_weights"].items()) + " are folded into the weights)"
    lines.append(f"normalisation  {desc}")
    if "threshold" in r:
        t = r["threshold"]
        lines.append(f"threshold      min {t['min']:.4g}, median {t['median']:.4g}, max {t['max']:.4g}; applies to "
                     f"{t['space']}")
    d = r["decoder_norms"]
    lines.append(f"decoder norms  min {d['min']:.4g}, median {d['median']:.4g}, max {d['max']:.4g}"
                 + ("; TopK ranks by code x norm" if r["rank_by_decoder_norm"] else ""))
    lines.append(f"code scale     {r['code_scale']}; encode(x, scale='decoder_norm') gives each latent's "
                 "contribution to the reconstruction's norm")
    for note in r["notes"]:
        lines.append(f"note           {note}")
    m = r.get("measured")
    if m:
        what = "MLP output" if r["transcoder"] else "activations"
        lines.append(f"on {m['store']} ({m['rows']:,} rows): L0 {fmt(m['l0'])}, explained variance of the {what} "
                     f"{fmt(m['explained_variance'])} (FVU {fmt(m['fvu'])}), dead latents {m['dead_fraction']:.1%}")
        for note in m["notes"]:
            lines.append(f"note           {note}")
    return "\n".join(lines)


def report_json(r: dict[str, Any]) -> str:
    return json.dumps(r, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
