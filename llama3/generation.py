"""``Llama``: build from a checkpoint directory, batched and streaming text/chat completion.

Batching follows Meta's reference: prompts are left-aligned, the shortest prompt is prefilled, and the
loop then advances one position at a time, forcing prompt tokens where a row's prompt is longer. Each
row therefore sees exactly the positions and tokens it would see alone, so batched greedy output equals
per-prompt output. Sampling uses one generator per row (seeded ``seed + row``) so a row's samples do
not depend on what else is in the batch.
"""

from __future__ import annotations

import codecs
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .chat_template import chat_format_for
from .checkpoint import check_vocab, detect_layout, load_model, load_tokenizer
from .compilation import decode_compile_options
from .decode_paths import PATHS, DecodeStep, build_step, choose, prefill_scope
from .model import Transformer
from .tokenizer import Tokenizer

Message = Mapping[str, str]
Dialog = Sequence[Message]


@dataclass
class Completion:
    text: str
    tokens: list[int]
    """Generated token ids only (no prompt, no stop token)."""
    stop_reason: str
    """"stop" (a stop token), "length" (max_gen_len reached) or "max_seq_len" (the context is full)."""
    prompt_tokens: list[int] = field(default_factory=list)


@dataclass
class StreamStep:
    """One decoding step of a batch. ``deltas[i]`` is the new text of row i (possibly ""), never half a
    UTF-8 character; ``tokens[i]`` the token sampled for row i this step (None if the row is still in
    its prompt or already finished); ``done[i]`` whether row i has finished."""

    deltas: list[str]
    tokens: list[int | None]
    done: list[bool]
    completions: list[Completion] | None = None
    """Set on the last step only: the finished completions, as ``text_completion`` returns them."""


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> int:
    """Nucleus sampling for one row of probabilities [vocab].

    The nucleus is the smallest set of most-probable tokens whose mass reaches ``top_p``. The draw then
    runs over the nucleus in vocabulary order, not in sorted order: near-equal probabilities whose sort
    order flips with last-bit rounding (batched vs single-row logits) then pick the same token.
    """
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[cumulative - sorted_probs < top_p]] = True  # the most probable token always stays
    kept = torch.where(keep, probs, torch.zeros_like(probs)).float().cpu()
    return int(torch.multinomial(kept / kept.sum(), 1, generator=generator).item())


class _Utf8Stream:
    """Turns a row's token ids into text deltas without ever splitting a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.decode_bytes([token]))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class Llama:
    """A Llama 3 model with its tokenizer and chat format, ready to generate."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, decode_path: str = "eager",
                 report: Callable[[str], None] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = chat_format_for(tokenizer)
        self._decode_step: Callable | None = None
        self._prefill: Callable | None = None
        self._steps: dict[str, DecodeStep] = {}  # by path name; one step serves every batch size
        self._path_of: dict[int, str] = {}  # by batch bucket
        self._prefill_of: dict[int, str] = {}  # by batch bucket (auto only; forced paths prefill eagerly)
        self.report = report
        """Where the auto decode path's one-line choice goes (default: stderr)."""
        self.set_decode_path(decode_path)

    def set_decode_path(self, name: str) -> None:
        """How decode steps run (``llama3.decode_paths``): ``auto`` measures the candidates on this machine
        (once for batch 1 and once for larger batches, at their first generation; cached on disk), or one of
        ``PATHS`` forced. ``$LLAMA3_SAE_DECODE_PATH``, when set, is what ``auto`` means. ``int8`` quantises
        the model in place and cannot be undone."""
        if name == "auto":
            name = os.environ.get("LLAMA3_SAE_DECODE_PATH") or "auto"
        if name != "auto" and name not in PATHS:
            raise ValueError(f"unknown decode path {name!r}; expected auto or one of {', '.join(PATHS)}")
        self._steps, self._path_of, self._prefill_of = {}, {}, {}
        self.decode_path = name
        if name == "int8":  # quantise now, before anything else reads the weights
            self._steps[name] = build_step(self.model, name)

    @staticmethod
    def build(ckpt_dir: str | Path, max_seq_len: int = 2048, max_batch_size: int = 4,
              device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
              store_layer_activ=None, sae_layer_forward_fn=None, compile: bool = False,
              decode_path: str = "eager", report: Callable[[str], None] | None = None) -> "Llama":
        """Load a Meta (params.json + consolidated.*.pth) or HF (config.json + *.safetensors) checkpoint, or a
        GGUF file (or a directory holding one), with the checkpoint's own tokenizer and chat format.

        The KV cache is sized ``max_batch_size x max_seq_len``. ``decode_path``: how decode steps run
        (``set_decode_path``; ``auto`` measures). ``compile=True`` compiles the whole one-token decode step
        as one graph with torch.compile (static shapes; the first steps pay minutes of compile time).
        """

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        detect_layout(ckpt_dir)  # says which files each layout needs before anything else is read
        tokenizer = load_tokenizer(ckpt_dir)
        model = load_model(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device,
                           dtype=dtype, store_layer_activ=store_layer_activ, sae_layer_forward_fn=sae_layer_forward_fn)
        check_vocab(model.params, tokenizer.n_words, exact=None, tokenizer=tokenizer)
        model.eval()
        model.setup_cache(max_batch_size, max_seq_len)
        llm = Llama(model, tokenizer, decode_path=decode_path, report=report)
        if compile:
            llm.compile()
        llm.load_seconds = time.perf_counter() - start
        return llm

    def compile(self, *, prefill: bool = False, **kwargs) -> None:
        """Compile the decode step (one token per row, static-shape cache path).

        The defaults come from ``llama3.compilation.decode_compile_options`` for the model's device
        (on CPU: inductor with matrix-vector products as streaming reductions); ``kwargs`` override
        them (e.g. ``backend=...`` or ``mode=...``, which replace the device's defaults).
        ``prefill=True`` also compiles the multi-token forward, with dynamic shapes (one graph for all
        prompt lengths): it fuses the element-wise work around the matrix products, a few percent of a
        prefill, for one more compilation."""

        model = self.model

        def step(tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return model(tokens, pos, last_only=True)

        options = decode_compile_options(model.tok_embeddings.weight.device)
        if "backend" in kwargs or "mode" in kwargs:  # torch.compile takes mode or options, not both
            options.pop("backend", None)
            options.pop("options", None)
        self._decode_step = torch.compile(step, **{**options, **kwargs})
        self._prefill = torch.compile(model, dynamic=True) if prefill else None

    # ------------------------------------------------------------------ core loop
    @torch.inference_mode()
    def stream(self, prompt_tokens: Sequence[Sequence[int]], *, temperature: float = 0.6, top_p: float = 0.9,
               max_gen_len: int | None = None, seed: int | None = None,
               stop_tokens: Sequence[int] | None = None,
               seeds: Sequence[int | None] | None = None) -> Iterator[StreamStep]:
        """Generate from token prompts, yielding one ``StreamStep`` per position advanced. Row i samples
        with ``seed + i``, or with ``seeds[i]`` when given (e.g. the same seed for a prompt's unsteered and
        steered rows)."""
        model, tok = self.model, self.tokenizer
        B = len(prompt_tokens)
        if B == 0:
            return
        lengths = [len(p) for p in prompt_tokens]
        total_len, max_gen_len = self._check_request(lengths, temperature, top_p, max_gen_len)
        max_seq_len = model.cache_shape[1]
        stops = set(stop_tokens if stop_tokens is not None else tok.stop_tokens)

        device = model.tok_embeddings.weight.device
        tokens = torch.zeros(B, total_len, dtype=torch.long, device=device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        lengths_t = torch.tensor(lengths, device=device)
        if seeds is not None and len(seeds) != B:
            raise ValueError(f"seeds gives {len(seeds)} seeds for {B} prompts")
        row_seeds = list(seeds) if seeds is not None else [None if seed is None else seed + i for i in range(B)]
        generators = [torch.Generator().manual_seed(s) if s is not None else None for s in row_seeds]
        streams = [_Utf8Stream(tok) for _ in range(B)]
        generated: list[list[int]] = [[] for _ in range(B)]
        reasons: list[str | None] = [None] * B

        prev_pos = 0
        for cur_pos in range(min(lengths), total_len):
            logits = self._next_logits(tokens[:, prev_pos:cur_pos], prev_pos)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
            in_prompt = cur_pos < lengths_t
            next_tokens = torch.argmax(logits, dim=-1)
            step_tokens: list[int | None] = [None] * B
            deltas = [""] * B
            for i in range(B):
                if reasons[i] is not None or bool(in_prompt[i]):
                    continue
                t = sample_top_p(probs[i], top_p, generators[i]) if temperature > 0 else int(next_tokens[i])
                next_tokens[i] = t
                step_tokens[i] = t
                if t in stops:
                    reasons[i] = "stop"
                    deltas[i] = streams[i].flush()
                    continue
                generated[i].append(t)
                deltas[i] = streams[i].push(t)
                if len(generated[i]) >= max_gen_len:
                    reasons[i] = "length"
                elif cur_pos + 1 >= max_seq_len:
                    reasons[i] = "max_seq_len"
                if reasons[i] is not None:
                    deltas[i] += streams[i].flush()
            tokens[:, cur_pos] = torch.where(in_prompt, tokens[:, cur_pos], next_tokens)
            prev_pos = cur_pos
            done = [r is not None for r in reasons]
            if all(done) or cur_pos + 1 == total_len:
                for i in range(B):
                    if reasons[i] is None:
                        reasons[i] = "length" if len(generated[i]) >= max_gen_len else "max_seq_len"
                        deltas[i] += streams[i].flush()
                completions = [Completion(text=tok.decode(generated[i]), tokens=generated[i],
                                          stop_reason=reasons[i], prompt_tokens=list(prompt_tokens[i]))
                               for i in range(B)]
                yield StreamStep(deltas, step_tokens, [True] * B, completions)
                return
            yield StreamStep(deltas, step_tokens, done)

    def _check_request(self, lengths: list[int], temperature: float, top_p: float, max_gen_len: int | None
                       ) -> tuple[int, int]:
        """Validate a generation request against the KV cache; (total length, max new tokens)."""
        shape = self.model.cache_shape
        if shape is None:
            raise ValueError("the model has no KV cache; build it with Llama.build or call model.setup_cache()")
        max_batch, max_seq_len = shape
        if len(lengths) > max_batch:
            raise ValueError(f"{len(lengths)} prompts exceed max_batch_size={max_batch}; pass fewer prompts or build "
                             f"with a larger max_batch_size")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        for i, n in enumerate(lengths):
            if n == 0:
                raise ValueError(f"prompt {i} is empty; text prompts get a BOS token, token prompts need >= 1 id")
            if n >= max_seq_len:
                raise ValueError(f"prompt {i} has {n} tokens, which leaves no room to generate within "
                                 f"max_seq_len={max_seq_len}; shorten it or build with a larger max_seq_len")
        if max_gen_len is None:
            max_gen_len = max_seq_len - 1
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {max_gen_len}")
        return min(max_seq_len, max(lengths) + max_gen_len), max_gen_len

    def _next_logits(self, chunk: torch.Tensor, start_pos: int) -> torch.Tensor:
        """The logits [B, vocab] after ``chunk`` (tokens from ``start_pos``): the compiled one-token step when
        there is one, else the (compiled) prefill or the model."""
        if chunk.shape[1] == 1 and (self._decode_step is not None or self.decode_path != "eager"):
            # A fresh [B, 1] tensor: the slice's row stride is total_len, and torch.compile guards on
            # strides, so passing the slice would recompile for every new prompt/generation length.
            step_input = torch.empty(chunk.shape, dtype=chunk.dtype, device=chunk.device).copy_(chunk)
            if self._decode_step is not None:
                logits = self._decode_step(step_input, torch.tensor(start_pos, device=chunk.device))
            else:
                logits = self._step_for(chunk.shape[0])(step_input, start_pos)
        else:
            forward = self._prefill if self._prefill is not None else self.model
            if self.decode_path == "auto" and self._prefill is None:
                self._step_for(chunk.shape[0])  # the choice (and its prefill path) for this batch
                with prefill_scope(self._prefill_of.get(self._bucket(chunk.shape[0]), "eager")):
                    logits = forward(chunk, start_pos, last_only=True)
            else:
                logits = forward(chunk, start_pos, last_only=True)
        return logits[:, -1]

    def _step_for(self, batch: int) -> DecodeStep:
        # Batch 1 (matrix-vector products) and larger batches behave differently; all larger batches share
        # one calibration, at the cache's batch size.
        bucket = self._bucket(batch)
        name = self._path_of.get(bucket)
        if name is None:
            if self.decode_path == "auto":
                choice = choose(self.model, bucket, report=self.report)
                name, self._prefill_of[bucket] = choice.path, choice.prefill
            else:
                name = self.decode_path
            self._path_of[bucket] = name
        if name not in self._steps:
            self._steps[name] = build_step(self.model, name)
        return self._steps[name]

    def prepare_decode(self, batch: int) -> str:
        """Choose (with ``auto``: calibrate now, not at the first generation) and build the decode path for
        ``batch`` rows; returns its name."""
        return self._step_for(batch).name

    def decode_path_for(self, batch: int) -> str | None:
        """The path decode steps of ``batch`` rows take (None: not chosen yet)."""
        if self.decode_path != "auto":
            return self.decode_path
        return self._path_of.get(self._bucket(batch))

    def _bucket(self, batch: int) -> int:
        return 1 if batch == 1 else self.model.cache_shape[0]

    def generate(self, prompt_tokens: Sequence[Sequence[int]], **kwargs) -> list[Completion]:
        result: list[Completion] = []
        for step in self.stream(prompt_tokens, **kwargs):
            if step.completions is not None:
                result = step.completions
        return result

    # ------------------------------------------------------------------ text and chat
    def _encode_prompts(self, prompts: Sequence[str], bos: bool) -> list[list[int]]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not a single string")
        return [self.tokenizer.encode(p, bos=bos, eos=False) for p in prompts]

    def _encode_dialogs(self, dialogs: Sequence[Dialog]) -> list[list[int]]:
        if dialogs and isinstance(dialogs[0], Mapping):
            raise ValueError("dialogs must be a list of dialogs (each a list of messages), not one dialog")
        return [self.formatter.encode_dialog_prompt(list(d)) for d in dialogs]

    def text_completion(self, prompts: Sequence[str], *, bos: bool | None = None, **kwargs) -> list[Completion]:
        """Complete each prompt. ``bos``: prepend BOS (default: the tokenizer's own rule, ``tokenizer.add_bos``).
        kwargs: temperature, top_p, max_gen_len, seed, stop_tokens."""
        return self.generate(self._encode_prompts(prompts, self._bos(bos)), **kwargs)

    def stream_text_completion(self, prompts: Sequence[str], *, bos: bool | None = None,
                               **kwargs) -> Iterator[StreamStep]:
        return self.stream(self._encode_prompts(prompts, self._bos(bos)), **kwargs)

    def _bos(self, bos: bool | None) -> bool:
        return bool(getattr(self.tokenizer, "add_bos", True)) if bos is None else bos

    def chat_completion(self, dialogs: Sequence[Dialog], **kwargs) -> list[Completion]:
        """Answer each dialog (list of {"role", "content"} messages) as the assistant."""
        return self.generate(self._encode_dialogs(dialogs), **kwargs)

    def stream_chat_completion(self, dialogs: Sequence[Dialog], **kwargs) -> Iterator[StreamStep]:
        return self.stream(self._encode_dialogs(dialogs), **kwargs)
