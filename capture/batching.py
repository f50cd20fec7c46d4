"""Tokenisation and length-bucketed batches.

Documents of one read-ahead window are tokenised, cut to ``max_tokens``, sorted by length and packed
greedily into batches whose padded size (rows x longest) stays within a token budget. Batches are
right-padded: with causal attention the real positions never see the padding after them, so their
activations are exact, and sorting keeps the padding that is computed small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .sources import Document


@dataclass
class EncodedDoc:
    doc_id: int
    ids: list[int]
    """Token ids after the cut to max_tokens."""


@dataclass
class Batch:
    tokens: torch.Tensor
    """[B, T] int64, right-padded."""
    keep: torch.Tensor
    """[B, T] bool: positions whose rows are stored (real tokens, minus a left-out leading BOS)."""
    row_tokens: torch.Tensor
    """[N] token id of each stored row, in row-major order of ``keep``."""
    row_doc_ids: torch.Tensor
    """[N] int64 global document index of each stored row."""
    row_positions: torch.Tensor
    """[N] int32 position of each stored row in its document."""
    real_tokens: int
    """Tokens of the documents (what the forward had to compute)."""

    @property
    def padded_tokens(self) -> int:
        return self.tokens.numel()


def render_tokens(doc: Document, tokenizer: Any, chat_format: Any, *, bos: bool) -> list[int]:
    """The token ids of one document: text with optional BOS, or a chat in the Llama 3 chat format.
    A chat that ends with an assistant message is complete and gets no open assistant header."""
    if doc.messages is None:
        assert doc.text is not None
        return tokenizer.encode(doc.text, bos=bos, eos=False)
    if doc.messages[-1]["role"] == "assistant":
        ids = [tokenizer.bos_id]
        for i, m in enumerate(doc.messages):
            ids += chat_format.encode_message(m, where=f"doc {doc.doc_id} message {i}")
        return ids
    return chat_format.encode_dialog_prompt(doc.messages)


def encode_window(docs: Sequence[Document], tokenizer: Any, chat_format: Any, *, bos: bool, max_tokens: int,
                  counters: dict[str, int]) -> list[EncodedDoc]:
    """Tokenise and cut a window of documents; cut tokens are counted in ``counters``."""
    out = []
    for doc in docs:
        ids = render_tokens(doc, tokenizer, chat_format, bos=bos)
        if len(ids) > max_tokens:
            counters["truncated_docs"] = counters.get("truncated_docs", 0) + 1
            counters["truncated_tokens"] = counters.get("truncated_tokens", 0) + len(ids) - max_tokens
            ids = ids[:max_tokens]
        if not ids:
            counters["empty_docs"] = counters.get("empty_docs", 0) + 1
            continue
        out.append(EncodedDoc(doc.doc_id, ids))
    return out


def plan_batches(lengths: Sequence[int], token_budget: int, max_padding: float = 1.0) -> list[list[int]]:
    """Indices grouped into batches, longest first, so that len(batch) * max length <= token_budget and
    every document is at least (1 - max_padding) x its batch's longest. Every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if n > token_budget:
            raise ValueError(f"a document of {n} tokens does not fit the token budget {token_budget}; "
                             "raise --tokens-per-batch or lower --max-tokens")
        # Sorted longest first, so the batch's first document sets its padded length.
        if current and ((len(current) + 1) * longest > token_budget or n < (1.0 - max_padding) * longest):
            batches.append(current)
            current = []
        if not current:
            longest = n
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(docs: Sequence[EncodedDoc], *, pad_id: int, skip_first: Sequence[bool]) -> Batch:
    """Right-pad documents into a batch. ``skip_first[i]``: do not store document i's first row."""
    B, T = len(docs), max(len(d.ids) for d in docs)
    tokens = torch.full((B, T), pad_id, dtype=torch.int64)
    lengths = torch.tensor([len(d.ids) for d in docs])
    for i, d in enumerate(docs):
        tokens[i, : len(d.ids)] = torch.tensor(d.ids)
    pos = torch.arange(T)
    starts = torch.tensor([int(s) for s in skip_first])
    keep = (pos[None, :] < lengths[:, None]) & (pos[None, :] >= starts[:, None])  # [B, T]
    counts = keep.sum(1)
    doc_ids = torch.tensor([d.doc_id for d in docs], dtype=torch.int64)
    return Batch(
        tokens=tokens,
        keep=keep,
        row_tokens=tokens[keep].to(torch.int32),
        row_doc_ids=doc_ids.repeat_interleave(counts),
        row_positions=pos.expand(B, T)[keep].to(torch.int32),
        real_tokens=int(lengths.sum()),
    )
