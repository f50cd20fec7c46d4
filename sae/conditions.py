"""Conditions on latent activations, for steering that applies only where they hold (Goodfire's
``set_when(feature > 0.75, ...)``): ``12>0.75``, ``12>0.75 & 5<=1``, ``12>0.75 | 7>0``, with ``&`` binding
tighter than ``|`` (``and`` / ``or`` work too). A condition is read per token from the SAE's code of the
unedited activations at that token, so it holds or not position by position, identically with or
without the KV cache and independently in every batch row.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable

import torch

COMPARISONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}
_TEST = re.compile(r"^\s*(\d+)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Test:
    """latent OP value, e.g. 12 > 0.75."""

    latent: int
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.latent}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Condition:
    """An OR of ANDs of tests (``any_of[i]`` is one AND group)."""

    any_of: tuple[tuple[Test, ...], ...]

    @classmethod
    def parse(cls, text: str) -> Condition:
        """``12>0.75 & 5<1 | 7>0`` -> Condition; a ValueError that shows the expected form otherwise."""
        groups = []
        for part in re.split(r"\s*(?:\||\bor\b)\s*", text.strip()):
            tests = []
            for item in re.split(r"\s*(?:&|\band\b)\s*", part):
                m = _TEST.match(item)
                if m is None:
                    raise ValueError(f"cannot read the condition {text!r} at {item!r}: write LATENT OP VALUE with OP "
                                     "one of > >= < <= == !=, joined by & (and) and | (or), e.g. '12>0.75 & 5<1'")
                tests.append(Test(int(m[1]), m[2], float(m[3])))
            groups.append(tuple(tests))
        return cls(tuple(groups))

    @property
    def latents(self) -> list[int]:
        """The latents the condition reads, ascending."""
        return sorted({t.latent for group in self.any_of for t in group})

    def holds(self, activation: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Where the condition holds: a bool tensor shaped like ``activation(latent)`` (one value per token)."""
        out = None
        for group in self.any_of:
            both = None
            for t in group:
                hit = COMPARISONS[t.op](activation(t.latent), t.value)
                both = hit if both is None else both & hit
            out = both if out is None else out | both
        assert out is not None
        return out

    def __str__(self) -> str:
        return " | ".join(" & ".join(map(str, group)) for group in self.any_of)
