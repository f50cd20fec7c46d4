"""Pull the final JSON answer out of an LLM reply, tolerantly, and say exactly why when it cannot.

Replies come as free text: reasoning in ``<semantic_analysis>`` (labels) or ``<analysis>`` (scoring),
then a JSON object, possibly inside a Markdown fence, possibly followed by more text. The original
project rejected an integer certainty and crashed on anything unexpected; here every reply either
parses into a typed result or into a ``ParseError`` whose message names the problem, and callers
record the raw text next to it so nothing is lost.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON|javascript|js)?[ \t]*\n(.*?)```", re.DOTALL)
_ANALYSIS_RE = re.compile(r"<(semantic_analysis|analysis)>(.*?)(?:</\1>|$)", re.DOTALL)


class ParseError(ValueError):
    """A reply that holds no usable answer; the message says what was missing or wrong."""


@dataclass
class LabelAnswer:
    label: str
    """The ``common_semantic`` text, stripped."""
    certainty: float | None
    """In [0, 1]; None when the reply's certainty was missing or unusable (see ``warning``)."""
    reasoning: str
    """The text of the ``<semantic_analysis>`` block ('' when the reply had none)."""
    certainty_raw: Any = None
    """The certainty as written when it was not a float (e.g. ``1``, ``"80%"``, ``85``), else None."""
    warning: str = ""
    """Why ``certainty`` is None, or ''."""


@dataclass
class DetectionAnswer:
    answers: list[int]
    """One 0/1 per numbered example, in the order shown."""
    reasoning: str


def reply_text(content: list[dict[str, Any]] | None) -> str:
    """The text of a Messages API reply: its ``text`` blocks joined. Thinking blocks (models with
    adaptive thinking return them) are reasoning, not the answer, so they are left out."""
    return "".join(block.get("text", "") for block in content or () if block.get("type") == "text")


def _json_candidates(text: str) -> Iterator[Any]:
    """Every JSON value that starts at a ``{`` or ``[`` in ``text`` (fenced blocks first), in order.

    ``raw_decode`` stops at the end of the value, so text after the JSON (a closing remark, a second
    fence) does not spoil it. Python-literal dicts with single quotes are accepted too, since models
    sometimes write them.
    """
    decoder = json.JSONDecoder()
    chunks = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    for chunk in chunks:
        for m in re.finditer(r"[\[{]", chunk):
            start = m.start()
            try:
                value, _ = decoder.raw_decode(chunk, start)
            except json.JSONDecodeError:
                value = _python_literal(chunk, start)
                if value is None:
                    continue
            yield value


def _python_literal(text: str, start: int) -> Any:
    """A ``{...}`` written as a Python literal (single quotes, True/False), or None."""
    if text[start] != "{":
        return None
    depth = 0
    for i in range(start, min(len(text), start + 20_000)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                try:
                    value = ast.literal_eval(text[start:i + 1])
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    return None
                return value if isinstance(value, dict) else None
    return None


def _reasoning(text: str) -> str:
    m = _ANALYSIS_RE.search(text)
    return m.group(2).strip() if m else ""


def parse_certainty(value: Any) -> float:
    """A certainty as written -> float in [0, 1]. Accepts ints (0, 1), floats, numeric strings and
    percentages (``"80%"``). A bare number above 1 is ambiguous (percent? out of 10?) and is refused."""
    raw = value
    percent = False
    if isinstance(value, bool):
        raise ParseError(f"certainty is a boolean ({value!r}); expected a number in [0, 1]")
    if isinstance(value, str):
        s = value.strip()
        if s.endswith("%"):
            percent, s = True, s[:-1].strip()
        try:
            value = float(s)
        except ValueError:
            raise ParseError(f"certainty {raw!r} is not a number") from None
    if not isinstance(value, (int, float)):
        raise ParseError(f"certainty has type {type(raw).__name__} ({raw!r}); expected a number in [0, 1]")
    x = float(value)
    if math.isnan(x):
        raise ParseError("certainty is NaN")
    if percent:
        x /= 100.0
    if not 0.0 <= x <= 1.0:
        raise ParseError(f"certainty {raw!r} is outside [0, 1]")
    return x


def parse_label(text: str) -> LabelAnswer:
    """The last JSON object with a ``common_semantic`` key in ``text`` -> ``LabelAnswer``.

    A usable label with a missing or unusable certainty is kept: ``certainty`` is None and ``warning``
    says why (the label is the expensive part; a bad certainty should not throw it away)."""
    if not text or not text.strip():
        raise ParseError("empty reply")
    found = [v for v in _json_candidates(text) if isinstance(v, dict) and "common_semantic" in v]
    if not found:
        hint = " (the reply looks cut off: raise --max-tokens)" if text.count("{") > text.count("}") else ""
        raise ParseError(f'no JSON object with a "common_semantic" key in the reply{hint}')
    obj = found[-1]
    label = obj["common_semantic"]
    if not isinstance(label, str) or not label.strip():
        raise ParseError(f'"common_semantic" must be a non-empty string, got {label!r}')
    certainty: float | None = None
    warning = ""
    if "certainty" not in obj:
        warning = 'the JSON answer has no "certainty"'
    else:
        try:
            certainty = parse_certainty(obj["certainty"])
        except ParseError as e:
            warning = str(e)
    return LabelAnswer(label=" ".join(label.split()), certainty=certainty, reasoning=_reasoning(text),
                       certainty_raw=None if isinstance(obj.get("certainty"), float) else obj.get("certainty"),
                       warning=warning)


def _as_bit(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "yes", "no", "true", "false"):
        return int(value.strip().lower() in ("1", "yes", "true"))
    raise ParseError(f"{where} is {value!r}; expected 0 or 1")


def parse_detection(text: str, n_examples: int) -> DetectionAnswer:
    """The detection answer for ``n_examples`` numbered examples: the last JSON object with an
    ``answers`` list (or, failing that, the last bare list) of exactly ``n_examples`` 0/1 values."""
    if not text or not text.strip():
        raise ParseError("empty reply")
    candidates = list(_json_candidates(text))
    lists = [v["answers"] for v in candidates if isinstance(v, dict) and isinstance(v.get("answers"), list)]
    if not lists:
        lists = [v for v in candidates if isinstance(v, list) and v and not isinstance(v[0], (list, dict))]
    if not lists:
        raise ParseError('no JSON object with an "answers" list in the reply')
    answers = lists[-1]
    if len(answers) != n_examples:
        raise ParseError(f"the answer has {len(answers)} entries for {n_examples} examples")
    bits = [_as_bit(v, f"answer {i + 1}") for i, v in enumerate(answers)]
    return DetectionAnswer(answers=bits, reasoning=_reasoning(text))
