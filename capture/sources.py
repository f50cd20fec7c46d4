"""Text sources: parquet / jsonl / plain text files streamed into numbered documents.

A *record* is one parquet row, one jsonl line or one text line. A *document* is what gets one
``doc_id``: a record, or one sentence of a record with ``split_sentences``. Documents are numbered in one
deterministic global order (files in the given order, records in file order, optional seeded shuffle
buffer, optional limit), so every rank of a distributed capture sees the same numbering and takes its
own share, and rows of different ranks can be merged by ``doc_id``.

Nothing is read whole into memory, and bad input (empty lines, broken UTF-8, malformed JSON, missing
fields) is skipped or repaired with a count in ``SourceStats`` rather than stopping a long job.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from llama3.tokenizer import ROLES

from .config import SourceConfig

SUFFIX_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".txt": "text"}
_MAX_EXAMPLES = 5  # locations of bad records kept for the summary


class Document(NamedTuple):
    doc_id: int
    """Global index of the document in the source order."""
    text: str | None
    """The text (None for a chat)."""
    messages: list[dict[str, str]] | None
    """A chat's messages (None for text)."""


@dataclass
class SourceStats:
    """Counts of what the source stage read, skipped and repaired."""

    files: int = 0
    records: int = 0
    empty: int = 0
    """Records or sentences that were empty, whitespace only or shorter than --min-chars."""
    bad_utf8_replaced: int = 0
    bad_utf8_skipped: int = 0
    malformed: int = 0
    """Records that were not valid JSON, lacked the field, or had a value of the wrong type."""
    sentences: int = 0
    documents: int = 0
    """Documents numbered (before the limit cut the stream)."""
    examples: list[str] = field(default_factory=list)
    """Where the first few bad records are (file:line and why)."""
    keys_seen: dict[str, int] = field(default_factory=dict)
    """Keys of the JSON objects that lacked the text field (counts), to say what the data holds instead."""

    def note(self, where: str) -> None:
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(where)

    def problems(self) -> str:
        """One line of the skip/repair counts, empty when there were none."""
        parts = []
        if self.empty:
            parts.append(f"{self.empty:,} empty/short skipped")
        if self.bad_utf8_replaced:
            parts.append(f"{self.bad_utf8_replaced:,} lines with invalid UTF-8 repaired (U+FFFD)")
        if self.bad_utf8_skipped:
            parts.append(f"{self.bad_utf8_skipped:,} lines with invalid UTF-8 skipped")
        if self.malformed:
            parts.append(f"{self.malformed:,} malformed records skipped")
        line = ", ".join(parts)
        if self.examples:
            line += " (first: " + "; ".join(self.examples) + ")"
        return line


# --------------------------------------------------------------------------- files
def resolve_files(data: Iterable[Path], fmt: str = "auto") -> list[tuple[Path, str]]:
    """Expand directories and decide each file's format. Raises ValueError for what cannot be read."""
    out: list[tuple[Path, str]] = []
    for path in data:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix_format(p) is not None)
            if not found:
                raise ValueError(f"--data {path}: the directory holds no .parquet, .jsonl(.gz) or .txt(.gz) files")
            out += [(p, fmt if fmt != "auto" else _suffix_format(p)) for p in found]  # type: ignore[misc]
        elif path.is_file():
            file_fmt = fmt if fmt != "auto" else _suffix_format(path)
            if file_fmt is None:
                raise ValueError(f"--data {path}: cannot tell the format from the suffix; name it .parquet, "
                                 ".jsonl or .txt (optionally .gz), or pass --format parquet|jsonl|text")
            out.append((path, file_fmt))
        else:
            raise ValueError(f"--data {path}: no such file or directory")
    for path, file_fmt in out:
        if file_fmt == "parquet" and path.suffix == ".gz":
            raise ValueError(f"{path}: gzip-compressed parquet is not supported (parquet compresses internally)")
    return out


def _suffix_format(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def count_records(files: list[tuple[Path, str]]) -> int | None:
    """Cheap record count for progress/ETA: parquet metadata and newline counts of uncompressed files.
    None when a file is compressed (its count would cost a full decompression)."""
    total = 0
    for path, fmt in files:
        if fmt == "parquet":
            total += _parquet_file(path).metadata.num_rows
        elif path.suffix == ".gz":
            return None
        else:
            with open(path, "rb") as f:
                last = b""
                while block := f.read(1 << 24):
                    total += block.count(b"\n")
                    last = block
                total += bool(last) and not last.endswith(b"\n")
    return total


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow "
                         "(or pip install 'llama3-sae[data]')") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e


# --------------------------------------------------------------------------- records
def iter_records(files: list[tuple[Path, str]], cfg: SourceConfig, stats: SourceStats) -> Iterator[Any]:
    """Yield each record's text (str) or, with ``cfg.chat``, its validated message list."""
    field_name = cfg.messages_field if cfg.chat else cfg.text_field
    for path, fmt in files:
        stats.files += 1
        if fmt == "parquet":
            records = _parquet_values(path, field_name, stats)
        else:
            records = _line_values(path, fmt, field_name, cfg, stats)
        for where, value in records:
            stats.records += 1
            if cfg.chat:
                messages = _check_messages(value)
                if isinstance(messages, str):
                    stats.malformed += 1
                    stats.note(f"{where}: {messages}")
                    continue
                yield messages
            else:
                if value is None:
                    stats.empty += 1
                    continue
                if not isinstance(value, str):
                    stats.malformed += 1
                    stats.note(f"{where}: {field_name!r} is {type(value).__name__}, not a string")
                    continue
                yield value


def _parquet_values(path: Path, field_name: str, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    pf = _parquet_file(path)
    columns = pf.schema_arrow.names
    if field_name not in columns:
        raise ValueError(f"{path}: no column {field_name!r} (columns: {columns}); pass --text-field / --messages-field")
    row = 0
    for batch in pf.iter_batches(batch_size=8192, columns=[field_name]):
        for value in batch.column(0).to_pylist():
            yield f"{path}:row {row}", value
            row += 1


def _line_values(path: Path, fmt: str, field_name: str, cfg: SourceConfig,
                 stats: SourceStats) -> Iterator[tuple[str, Any]]:
    with _open_binary(path) as raw:
        for lineno, line in enumerate(raw, 1):
            where = f"{path}:{lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                if cfg.bad_utf8 == "skip":
                    stats.bad_utf8_skipped += 1
                    stats.note(f"{where}: invalid UTF-8 (skipped)")
                    continue
                stats.bad_utf8_replaced += 1
                stats.note(f"{where}: invalid UTF-8 (repaired)")
                text = line.decode("utf-8", errors="replace")
            text = text.rstrip("\r\n")
            if fmt == "text":
                yield where, text
                continue
            if not text.strip():
                stats.empty += 1
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                stats.malformed += 1
                stats.note(f"{where}: invalid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict) or field_name not in obj:
                stats.malformed += 1
                stats.note(f"{where}: no key {field_name!r}")
                if isinstance(obj, dict) and len(stats.keys_seen) < 50:
                    for k in obj:
                        stats.keys_seen[str(k)] = stats.keys_seen.get(str(k), 0) + 1
                continue
            yield where, obj[field_name]


def _check_messages(value: Any) -> list[dict[str, str]] | str:
    """The messages as plain dicts, or a string saying what is wrong with them."""

    if not isinstance(value, list) or not value:
        return "messages must be a non-empty list"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must have string 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {i} has unknown role {m['role']!r} (known: {sorted(ROLES)})"
        out.append({"role": m["role"], "content": m["content"]})
    return out


# --------------------------------------------------------------------------- sentences
def make_splitter(name: str) -> Callable[[str], list[str]]:
    """A sentence splitter from a maintained library. Raises ValueError saying how to install it."""
    if name == "blingfire":
        try:
            import blingfire
        except ImportError:
            raise ValueError("--splitter blingfire needs the blingfire package: pip install blingfire "
                             "(its model ships in the wheel; no download), or pick --splitter pysbd") from None
        return lambda text: blingfire.text_to_sentences(text).split("\n")
    if name == "pysbd":
        try:
            import pysbd
        except ImportError:
            raise ValueError("--splitter pysbd needs the pysbd package: pip install pysbd") from None
        segmenter = pysbd.Segmenter(language="en", clean=False)
        return segmenter.segment
    if name == "nltk":
        try:
            import nltk
        except ImportError:
            raise ValueError("--splitter nltk needs the nltk package: pip install nltk") from None
        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
        except LookupError:
            raise ValueError("--splitter nltk needs NLTK's Punkt data, which is not installed: run "
                             "`python -m nltk.downloader punkt_tab` (needs network), "
                             "or use --splitter blingfire") from None
        return lambda text: nltk.tokenize.sent_tokenize(text, language="english")
    raise ValueError(f"unknown sentence splitter {name!r}; choose blingfire, pysbd or nltk")


# --------------------------------------------------------------------------- documents
def _texts(records: Iterator[Any], cfg: SourceConfig, stats: SourceStats) -> Iterator[Any]:
    split = make_splitter(cfg.splitter) if cfg.split_sentences else None
    for rec in records:
        if cfg.chat:
            yield rec
            continue
        pieces = [rec] if split is None else split(rec)
        for piece in pieces:
            if split is not None:
                piece = piece.strip()
                if piece:
                    stats.sentences += 1
            if len(piece.strip()) < cfg.min_chars:
                stats.empty += 1
                continue
            yield piece


def shuffle_buffer(items: Iterator[Any], size: int, seed: int) -> Iterator[Any]:
    """Seeded streaming shuffle: each item is swapped into a buffer of ``size`` at a random place."""
    if size <= 1:
        yield from items
        return
    rng = random.Random(seed)
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def iter_documents(cfg: SourceConfig, stats: SourceStats | None = None,
                   files: list[tuple[Path, str]] | None = None) -> Iterator[Document]:
    """All documents in the global order, numbered from 0, at most ``cfg.limit`` of them."""
    stats = stats if stats is not None else SourceStats()
    files = files if files is not None else resolve_files(cfg.data, cfg.format)
    texts = shuffle_buffer(_texts(iter_records(files, cfg, stats), cfg, stats), cfg.shuffle_buffer, cfg.seed)
    for doc_id, item in enumerate(texts):
        if cfg.limit is not None and doc_id >= cfg.limit:
            return
        stats.documents += 1
        if cfg.chat:
            yield Document(doc_id, None, item)
        else:
            yield Document(doc_id, item, None)
    if stats.documents == 0:  # zero documents is never what a user asked for: say what the files hold
        raise ValueError(no_documents_message(cfg, files, stats))


def no_documents_message(cfg: SourceConfig, files: list[tuple[Path, str]], stats: SourceStats) -> str:
    names = ", ".join(str(p) for p, _ in files[:3]) + (" ..." if len(files) > 3 else "")
    field_name = cfg.messages_field if cfg.chat else cfg.text_field
    total = stats.records + stats.malformed + stats.bad_utf8_skipped
    msg = f"--data {names}: no documents ({total:,} records read"
    if stats.empty:
        msg += f", {stats.empty:,} empty or shorter than --min-chars"
    if stats.malformed:
        msg += f", {stats.malformed:,} malformed"
    msg += ")"
    if stats.keys_seen:
        keys = sorted(stats.keys_seen, key=lambda k: -stats.keys_seen[k])[:10]
        flag = "--messages-field" if cfg.chat else "--text-field"
        msg += f"; the JSON objects have no {field_name!r} key but hold {keys}: pass {flag} KEY"
    elif stats.examples:
        msg += f"; e.g. {stats.examples[0]}"
    return msg


def rank_documents(docs: Iterator[Document], rank: int, world: int) -> Iterator[Document]:
    """This rank's share: documents whose global index is ``rank`` modulo ``world``. Disjoint and
    complete over ranks, with no padding documents (unlike ``DistributedSampler``)."""
    assert 0 <= rank < world
    if world == 1:
        yield from docs
        return
    for doc in docs:
        if doc.doc_id % world == rank:
            yield doc


def skip_documents(docs: Iterator[Any], n: int, fix: str) -> Iterator[Any]:
    """``docs`` after the first ``n`` (what an interrupted run already committed). Fewer than ``n`` means the
    data changed since: a ValueError that says so and what to do (``fix``)."""
    for _ in range(n):
        if next(docs, None) is None:
            raise ValueError(f"the input has fewer documents than the {n} the interrupted run already read: the "
                             f"data under --data changed since. {fix}")
    return docs


def document_windows(docs: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive windows of ``size`` documents (the last may be shorter): bounded memory over any input."""
    window: list[Any] = []
    for doc in docs:
        window.append(doc)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window
