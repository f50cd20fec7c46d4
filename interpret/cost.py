"""What an LLM job will cost before it is sent: input tokens counted with ``messages.count_tokens`` on a sample
(extrapolated by characters), output tokens expected and at most, and a price per model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # requests come from the batch client, which imports this module
    from .requests import Request

# USD per million tokens at standard (non-batch) rates; the Batches API bills half. From Anthropic's
# pricing pages as of mid-2026. Prices change: --price-input-per-mtok / --price-output-per-mtok override.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "claude-sonnet-5-5": (2.0, 10.0),
    "claude-sonnet-5": (2.0, 10.0),
    "claude-opus-5-5": (4.0, 20.0),
    "claude-opus-4-8": (5.0, 25.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-haiku-4-5-20251001": (1.0, 5.0),
}
BATCH_DISCOUNT = 0.5
# Characters per token when count_tokens is unavailable; deliberately low so the estimate errs high.
FALLBACK_CHARS_PER_TOKEN = 3.0


@dataclass
class Estimate:
    n_requests: int
    input_tokens: int
    input_method: str
    output_tokens_expected: int
    output_tokens_max: int
    price: tuple[float, float] | None
    """USD per million input/output tokens after any batch discount; None when unknown."""
    price_note: str

    def cost(self, output_tokens: int) -> float | None:
        if self.price is None:
            return None
        return (self.input_tokens * self.price[0] + output_tokens * self.price[1]) / 1e6


def model_price(model: str, batch: bool, override_in: float | None, override_out: float | None
                ) -> tuple[tuple[float, float] | None, str]:
    """(USD per MTok input, output) for ``model`` at batch or standard rates, and where it came from."""
    base = PRICES_PER_MTOK.get(model)
    p_in = override_in if override_in is not None else (base[0] if base else None)
    p_out = override_out if override_out is not None else (base[1] if base else None)
    if p_in is None or p_out is None:
        return None, (f"no price known for {model!r}: pass --price-input-per-mtok and --price-output-per-mtok "
                      "(USD per million tokens, standard rate) to see a cost")
    factor = BATCH_DISCOUNT if batch else 1.0
    src = "given" if (override_in is not None or override_out is not None) else "built-in table, mid-2026"
    note = f"${p_in:g} / ${p_out:g} per MTok in/out ({src})" + (", batch price = 50%" if batch else "")
    return (p_in * factor, p_out * factor), note


def estimate(client: Any, requests: Sequence[Request], *, model: str, batch: bool, sample: int,
             expected_output_tokens: int, price_in: float | None, price_out: float | None) -> Estimate:
    """Input tokens from ``messages.count_tokens`` on up to ``sample`` requests, extrapolated by characters
    (Claude's tokenizer is not public, and counting all of 65,536 prompts would take long); output tokens
    as ``expected_output_tokens`` per reply and, as a ceiling, ``max_tokens``."""
    import anthropic

    n = len(requests)
    chars = [r.prompt_chars() for r in requests]
    total_chars = sum(chars)
    method = f"≈{FALLBACK_CHARS_PER_TOKEN:g} characters per token (approximate)"
    tokens = int(total_chars / FALLBACK_CHARS_PER_TOKEN)
    count_tokens = getattr(client.messages, "count_tokens", None)  # not in SDKs before ~0.4x (beta only)
    if sample > 0 and n and count_tokens is None:
        method += "; this anthropic SDK has no messages.count_tokens (upgrade it for a counted estimate)"
    elif sample > 0 and n:
        k = min(sample, n)
        idx = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
        try:
            counted = 0
            counted_chars = 0
            for i in idx:
                p = requests[i].params
                kwargs = {"model": p["model"], "messages": p["messages"]}
                if p.get("system"):
                    kwargs["system"] = p["system"]
                counted += int(count_tokens(**kwargs).input_tokens)
                counted_chars += chars[i]
            if counted_chars:
                tokens = int(round(total_chars * counted / counted_chars))
                method = (f"messages.count_tokens on {len(idx)} of {n} requests" +
                          (", extrapolated by characters" if len(idx) < n else ""))
        except anthropic.APIError as e:
            method += f"; count_tokens failed ({type(e).__name__})"
    max_tokens = int(requests[0].params.get("max_tokens", 0)) if requests else 0
    price, note = model_price(model, batch, price_in, price_out)
    return Estimate(n, tokens, method, expected_output_tokens * n, max_tokens * n, price, note)
