"""Llama 3 tokenizer (tiktoken BPE) and chat format, token-identical to Meta's reference.

The reference is ``llama_models.llama3`` (``Tokenizer`` and ``ChatFormat``) from the
``llama-models`` package. This module needs only the stdlib and tiktoken; of ``llama-models``
it uses nothing but the ``tokenizer.model`` data file (see ``default_tokenizer_path``).
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import AbstractSet, Literal, Union

import tiktoken

__all__ = ["Tokenizer", "ChatFormat", "Message", "default_tokenizer_path", "ROLES"]

# Llama 3 pre-tokenisation pattern (the same string Meta passes to tiktoken).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_RESERVED_SPECIAL_TOKENS = 256

# The named special tokens in id order, right after the BPE ranks (128000 on). This is the list
# of llama-models >= 0.1 (Llama 3.2), which put <|image|> at 128011; the Llama 3.1 release had
# <|reserved_special_token_2|> there, so only the *names* of the reserved tokens from 128011 on
# differ between the two. The remaining ids are <|reserved_special_token_N|>, N counting on from 2.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model expects a tool result next
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)

# tiktoken's Rust encoder can overflow its stack on very long inputs; Meta encodes in slices of
# at most this many characters ...
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# ... and further cuts any run of whitespace or non-whitespace longer than this
# (https://github.com/openai/tiktoken/issues/195). Both cuts change the tokens at the cut, so
# they are part of the token-exact contract, not just a safety measure.
MAX_NO_WHITESPACES_CHARS = 25_000

_RUN_RE = re.compile(r"\s+|\S+")  # Python's \s is exactly str.isspace(), which Meta's split uses

AllowedSpecial = Union[Literal["all", "none"], AbstractSet[str], None]
DisallowedSpecial = Union[Literal["all"], Collection[str]]


def default_tokenizer_path() -> Path:
    """The Llama 3 ``tokenizer.model`` shipped inside the installed ``llama-models`` package.

    Located with ``importlib.util.find_spec`` on the top-level package only, which does not run
    any of llama-models' Python code.
    """
    hint = (
        "Install it with `pip install llama-models`, or pass the path of a Llama 3 "
        "tokenizer.model explicitly (Meta checkpoints ship it next to params.json; HF "
        "checkpoints under original/)."
    )
    try:
        spec = importlib.util.find_spec("llama_models")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The llama-models package is not installed. {hint}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "The installed llama-models package has no llama3/tokenizer.model (looked in "
        f"{list(spec.submodule_search_locations)}). {hint}"
    )


def _load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one ``<base64 token> <rank>`` per line, ranks 0..n-1."""
    if not path.exists():
        raise FileNotFoundError(
            f"Tokenizer file not found: {path}. Expected Meta's Llama 3 tokenizer.model "
            "(a tiktoken BPE file of '<base64 token> <rank>' lines)."
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"Tokenizer path {path} is a directory; pass the tokenizer.model file inside it "
            f"(e.g. {path / 'tokenizer.model'})."
        )
    data = path.read_bytes()
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not a tiktoken BPE file (it is binary; a Llama 1/2 SentencePiece "
            "tokenizer.model looks like this). Llama 3 needs the tiktoken tokenizer.model."
        ) from None

    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 2 fields")
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (ValueError, binascii.Error) as e:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise ValueError(
                f"{path}, line {lineno}: malformed tiktoken BPE line {shown!r} ({e}); "
                "expected '<base64 token> <integer rank>'."
            ) from None
        if token in ranks:
            raise ValueError(f"{path}, line {lineno}: token {token!r} appears twice.")
        ranks[token] = rank

    if not ranks:
        raise ValueError(f"{path} holds no BPE ranks; expected Meta's Llama 3 tokenizer.model.")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(
            f"{path}: the {len(ranks)} ranks are not exactly 0..{len(ranks) - 1} "
            "(duplicated or missing ranks); special-token ids would be wrong."
        )
    return ranks


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut ``s`` so no piece holds more than ``max_run`` consecutive whitespace or
    non-whitespace characters, at exactly the places Meta's reference cuts: every ``max_run``
    characters into a run that is too long.
    """
    if len(s) <= max_run:  # no run can be too long; the common case
        yield s
        return
    start = 0
    for run in _RUN_RE.finditer(s):
        run_start, run_end = run.span()
        for cut in range(run_start + max_run, run_end, max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


def check_ids(ids: Sequence[int], n_words: int) -> list[int]:
    """``ids`` as ints, or a ValueError listing those outside [0, n_words) (every tokenizer's decode check)."""
    out = [int(t) for t in ids]
    bad = [t for t in out if not 0 <= t < n_words]
    if bad:
        raise ValueError(f"token ids out of range [0, {n_words}): {bad[:10]}"
                         + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    return out


class Tokenizer:
    """Llama 3 tokenizer: tiktoken BPE over 128,000 ranks plus 256 special tokens.

    ``pad_id`` is ``<|finetune_right_pad_id|>`` (128004) as in llama-models' current reference;
    Meta's first Llama 3 release used -1. ``n_words`` is 128,256 for the real file.
    """

    pat_str = PAT_STR
    num_reserved_special_tokens = NUM_RESERVED_SPECIAL_TOKENS

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        mergeable_ranks = _load_bpe_ranks(self.model_path)
        num_base_tokens = len(mergeable_ranks)

        names = list(_NAMED_SPECIAL_TOKENS)
        names += [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(self.num_reserved_special_tokens - len(names))
        ]
        self.special_tokens: dict[str, int] = {
            name: num_base_tokens + i for i, name in enumerate(names)
        }
        self.model = tiktoken.Encoding(
            name=self.model_path.name,
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )

        self.n_words: int = num_base_tokens + len(names)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.python_tag_id: int = self.special_tokens["<|python_tag|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens: list[int] = [self.eos_id, self.eom_id, self.eot_id]
        self.add_bos = True  # Llama 3 was trained with <|begin_of_text|> first; llama-models adds it
        self.chat_template: str | None = None  # chat uses Llama 3's header format (ChatFormat)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, n_words={self.n_words})"

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: AllowedSpecial = frozenset(),
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """Token ids of ``s``, with ``<|begin_of_text|>`` / ``<|end_of_text|>`` if asked.

        By default text that spells a special token (e.g. "<|eot_id|>" typed by a user) is
        encoded as ordinary text. ``allowed_special`` ("all" or a set of names) turns those
        names into their special ids; names in ``disallowed_special`` ("all" = every special
        token not allowed) make encoding raise ``ValueError`` instead.
        """
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        if allowed_special is None or allowed_special == "none":
            allowed_special = frozenset()
        elif allowed_special != "all":
            unknown = set(allowed_special) - self.special_tokens.keys()
            if unknown:
                raise ValueError(f"allowed_special names unknown special tokens: {sorted(unknown)}")

        tokens: list[int] = [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = s[i : i + TIKTOKEN_MAX_ENCODE_CHARS]
            for piece in _split_long_runs(chunk, MAX_NO_WHITESPACES_CHARS):
                tokens += self.model.encode(
                    piece, allowed_special=allowed_special, disallowed_special=disallowed_special
                )
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        return check_ids(ids, self.n_words)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 (a character split across the end)
        become U+FFFD. Special tokens decode to their names."""
        return self.model.decode(self._check_ids(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of ``ids``, for streaming without ever emitting half a UTF-8 character."""
        return self.model.decode_bytes(self._check_ids(ids))


Message = Mapping[str, str]  # {"role": "system"|"user"|"assistant"|"ipython", "content": str}

# Header text per accepted role. "tool" is llama-models' name for the tool-result role, which
# the model sees as "ipython".
ROLES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "ipython": "ipython",
    "tool": "ipython",
}


class ChatFormat:
    """Llama 3 chat prompt format for plain-text messages.

    ``<|begin_of_text|>``, then per message
    ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``, then an open
    assistant header for the model to complete.

    ``strip_content`` (default True) strips surrounding whitespace from each message's content,
    as Meta's original llama3 repository and the Hugging Face Llama 3 chat templates do.
    llama-models' ChatFormat does not strip; pass False to match it for content with
    surrounding whitespace (otherwise the two are identical).
    """

    def __init__(self, tokenizer: Tokenizer, *, strip_content: bool = True) -> None:
        self.tokenizer = tokenizer
        self.strip_content = strip_content

    @staticmethod
    def _validate(message: object, where: str = "message") -> tuple[str, str]:
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} must be a dict like {{'role': 'user', 'content': '...'}}, "
                f"got {type(message).__name__}"
            )
        missing = {"role", "content"} - message.keys()
        extra = message.keys() - {"role", "content"}
        if missing or extra:
            raise ValueError(
                f"{where} must have exactly the keys 'role' and 'content'"
                + (f"; missing {sorted(missing)}" if missing else "")
                + (f"; unexpected {sorted(map(str, extra))}" if extra else "")
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(
                f"{where} ({role}) content must be a str, got {type(content).__name__}"
            )
        return role, content

    def encode_header(self, message: Message | str) -> list[int]:
        """``<|start_header_id|>role<|end_header_id|>\\n\\n`` for a message or a role name."""
        role = message.get("role") if isinstance(message, Mapping) else message
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {sorted(ROLES)}")
        special = self.tokenizer.special_tokens
        return [
            special["<|start_header_id|>"],
            *self.tokenizer.encode(ROLES[role], bos=False, eos=False),
            special["<|end_header_id|>"],
            *self.tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message, *, where: str = "message") -> list[int]:
        """Header, content and ``<|eot_id|>`` of one message."""
        role, content = self._validate(message, where)
        if self.strip_content:
            content = content.strip()
        return [
            *self.encode_header(role),
            *self.tokenizer.encode(content, bos=False, eos=False),
            self.tokenizer.eot_id,
        ]

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        """Prompt tokens for a dialog, ending with an open assistant header."""
        if isinstance(dialog, (str, bytes, Mapping)) or not isinstance(dialog, Sequence):
            raise ValueError(
                "dialog must be a list of {'role': ..., 'content': ...} dicts, "
                f"got {type(dialog).__name__}"
            )
        tokens = [self.tokenizer.bos_id]
        for i, message in enumerate(dialog):
            tokens += self.encode_message(message, where=f"dialog[{i}]")
        tokens += self.encode_header("assistant")
        return tokens

    def decode_assistant_message(self, tokens: Sequence[int]) -> str:
        """Text of a generated reply: everything before the first stop token."""
        stops = set(self.tokenizer.stop_tokens)
        end = next((i for i, t in enumerate(tokens) if int(t) in stops), len(tokens))
        return self.tokenizer.decode(tokens[:end])
