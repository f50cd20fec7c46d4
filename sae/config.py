"""``SAEConfig``: everything needed to rebuild an SAE, saved as ``config.json`` beside its weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from llama3_sae.sites import parse_site, site_name

FORMAT_NAME = "llama3-sae"
FORMAT_VERSION = 2
"""Bump when config.json or the tensor layout changes meaning; ``from_dict`` rejects versions it does not know.
Version 2 added ``skip_connection``, the "per_token_rms" normalisation and transcoder sites; version 1 files
read unchanged."""
READABLE_VERSIONS = (1, 2)

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
NORMALIZATIONS = ("none", "per_token", "per_token_rms", "dataset")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SAEConfig:
    """Architecture and provenance of a sparse autoencoder.

    The math, in the normalised space (see ``normalization``)::

        pre   = W_enc (x - b_pre) + b_enc        # "- b_pre" only when apply_b_pre_to_input
        h     = act(pre)                         # topk / batchtopk / jumprelu / relu, never negative
        x_hat = W_dec^T h + b_pre  (+ W_skip x, the raw input, with skip_connection)

    A transcoder (site "L{layer}TC") has the same math, but reads block L's MLP input (``mlp_in``) and
    predicts its output (``mlp_out``): ``x_hat`` is the MLP output, not a copy of the input.
    """

    d_model: int
    """Width of the activations the SAE reads (the model's ``dim``)."""
    n_latents: int
    """Number of latents (dictionary size)."""
    architecture: str = "topk"
    """"topk" (k per token), "batchtopk" (k per token on average over a training batch, a learned
    threshold at inference), "jumprelu" (per-latent thresholds) or "relu" (trained with an L1 penalty)."""
    k: int | None = 64
    """Active latents per token for topk/batchtopk; None for jumprelu and relu."""
    rank_by_decoder_norm: bool = False
    """TopK ranks latents by relu(pre) * ||W_dec row|| (Llama Scope) instead of relu(pre) alone. With a
    unit-norm decoder the two agree."""
    apply_b_pre_to_input: bool = True
    """Subtract b_pre from the input before the encoder (OpenAI/seed); Llama Scope and Goodfire do not."""
    decoder_unit_norm: bool = True
    """Keep every latent's decoder vector at unit norm during training (and project its gradient)."""
    normalization: str = "none"
    """Input normalisation applied before the SAE and undone after it: "none"; "per_token"
    ((x - mean(x)) / (std(x) + norm_eps) for each token, the seed's); "dataset" ((x - shift) * scale with
    statistics stored in the SAE, e.g. Llama Scope's sqrt(d_model) / average norm); "per_token_rms"
    (x * sqrt(d_model) / ||x|| for each token, SAELens's constant_norm_rescale)."""
    norm_eps: float = 1e-6
    """Epsilon of per_token normalisation."""
    skip_connection: bool = False
    """A learned linear map of the raw input added to the output, W_skip [d_model, d_model] (sparsify's and
    SAELens's skip transcoders)."""
    site: str | None = None
    """Hook site the SAE reads, canonical short name such as "L15R", or "L15TC" for a transcoder of block
    15's MLP; None when unknown."""
    model_name: str | None = None
    """Model the SAE was trained on (free text, e.g. "meta-llama/Llama-3.2-3B")."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    prepend_bos: bool | None = None
    """Whether the training text started with the model's BOS token; None when unknown. Top examples, eval
    and the apps encode text the same way unless told otherwise."""
    first_token_excluded: bool | None = None
    """Whether each document's first row (BOS, or the first token without BOS: an attention sink whose norm
    is ~100x the others' from the middle layers on) was left out of training; None when unknown."""
    source: dict[str, Any] = field(default_factory=dict)
    """Provenance, e.g. {"format": "sae_lens", "path": ...} for a converted checkpoint."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("d_model", "n_latents"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive int")
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture={self.architecture!r} is not one of {ARCHITECTURES}")
        elif self.architecture in ("topk", "batchtopk"):
            if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
                problems.append(f"architecture={self.architecture!r} needs a positive int k, got k={self.k!r}")
            elif isinstance(self.n_latents, int) and self.k > self.n_latents:
                problems.append(f"k={self.k} exceeds n_latents={self.n_latents}")
        elif self.k is not None:
            problems.append(f"k={self.k!r} has no meaning for architecture={self.architecture!r}; use k=None")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization={self.normalization!r} is not one of {NORMALIZATIONS}")
        if not self.norm_eps > 0:
            problems.append(f"norm_eps={self.norm_eps!r} must be positive")
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.site is not None:
            try:
                self.site = canonical_site(self.site)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("invalid SAEConfig: " + "; ".join(problems))

    @property
    def is_transcoder(self) -> bool:
        """Reads block L's MLP input and predicts its output (site "L{L}TC")."""
        return self.site is not None and self.site.endswith("TC")

    @property
    def input_site(self) -> str | None:
        """The stored activation the SAE encodes: its site, or for a transcoder L{L}MI (the MLP input)."""
        return None if self.site is None else input_site_of(self.site)

    @property
    def output_site(self) -> str | None:
        """The activation the SAE reconstructs: its site, or for a transcoder L{L}M (the MLP output)."""
        return self.site[:-2] + "M" if self.is_transcoder else self.site

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **changes: Any) -> "SAEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        if not (self.skip_connection or self.normalization == "per_token_rms" or self.is_transcoder):
            # Nothing version 2 added is used: write version 1, which older releases read.
            body.pop("skip_connection")
            return {"format": FORMAT_NAME, "format_version": 1, **body}
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **body}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "SAEConfig":
        """Parse ``to_dict``'s output; unknown versions and unknown keys are errors, not guesses."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("format") != FORMAT_NAME:
            raise ValueError(f"{where}: format={raw.get('format')!r}, expected {FORMAT_NAME!r}")
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{where}: format_version={version!r} is not supported by this code "
                             f"(it reads versions {READABLE_VERSIONS}); upgrade llama3-sae or re-export the SAE")
        body = {k: v for k, v in raw.items() if k not in ("format", "format_version")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} for format_version {version}")
        return cls(**body)


def canonical_site(site: Any) -> str:
    """A site as this project writes it ("L15R", "L15TC" for a transcoder)."""
    # The site grammar belongs to the model module; import here so the SAE math has no model dependency.

    return site_name(parse_site(site))


def input_site_of(site: Any) -> str:
    """The stored activation an SAE at ``site`` encodes (the key in ``model.activations``): the site itself,
    or for a transcoder site L{L}TC its MLP input, L{L}MI."""
    name = canonical_site(site)
    return name[:-2] + "MI" if name.endswith("TC") else name


def resolve_bos(override: bool | None, cfg: SAEConfig | None, tokenizer: Any) -> tuple[bool, str | None]:
    """Whether to start text with BOS for an SAE, and a note when that differs from its training data.

    ``override`` (a user's --bos / --no-bos) wins; else the SAE's ``prepend_bos``; else the tokenizer's own
    rule (``tokenizer.add_bos``)."""
    trained = cfg.prepend_bos if cfg is not None else None
    model_rule = bool(getattr(tokenizer, "add_bos", True))
    if override is None:
        return (trained if trained is not None else model_rule), None
    if trained is not None and override != trained:
        return override, (f"note: {'--bos' if override else '--no-bos'} differs from the SAE's training data, which "
                          f"was captured {'with' if trained else 'without'} BOS; activations will not match it")
    return override, None
