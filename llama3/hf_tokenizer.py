"""Byte-level BPE tokenizers other than Llama 3's tiktoken file, on HF's ``tokenizers`` library.

Two sources: a GGUF file's ``tokenizer.ggml.*`` metadata (``TokenizerSpec``), rebuilt with the
pre-tokenizer llama.cpp uses for the file's ``tokenizer.ggml.pre``; or an HF ``tokenizer.json`` (+
``tokenizer_config.json`` for BOS/EOS, ``add_bos_token`` and the chat template), used as it is.

``HFTokenizer`` has the interface of ``llama3.tokenizer.Tokenizer`` (encode / decode / decode_bytes,
bos_id, eos_id, stop_tokens, special_tokens, n_words) plus ``add_bos``, the model's own BOS rule, and
``chat_template``. As with the Llama 3 tokenizer, text that spells a special token is encoded as plain
text unless ``allowed_special`` lets it through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import AbstractSet, Literal, Union

from .gguf import TokenizerSpec
from .tokenizer import check_ids

AllowedSpecial = Union[Literal["all", "none"], AbstractSet[str], None]

# GPT-2's split (what ByteLevel(use_regex=True) applies) and Llama 3's.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizers (llama-vocab.cpp), as the regexes applied one after the other.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "llama-bpe": (LLAMA3_SPLIT,), "llama3": (LLAMA3_SPLIT,), "llama-v3": (LLAMA3_SPLIT,),
    "smaug-bpe": (LLAMA3_SPLIT,),
    # SmolLM and the StarCoder family: every digit on its own, then GPT-2's split.
    "smollm": (r"\p{N}", GPT2_SPLIT), "starcoder": (r"\p{N}", GPT2_SPLIT), "refact": (r"\p{N}", GPT2_SPLIT),
    "codeshell": (r"\p{N}", GPT2_SPLIT),
    "gpt2": (GPT2_SPLIT,), "default": (GPT2_SPLIT,), "mpt": (GPT2_SPLIT,), "olmo": (GPT2_SPLIT,),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
# Control tokens that end a turn or a document in the chat formats we know (ChatML, Llama 3, GPT-2): generation
# stops on them besides the file's own EOS / EOT / EOM ids.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable spelling of the 256 bytes, inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("this model's tokenizer needs HF's tokenizers library: pip install tokenizers") from None
    return tokenizers


class HFTokenizer:
    """A tokenizer on HF ``tokenizers`` with the interface of the Llama 3 ``Tokenizer``."""

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None, stop_ids: Sequence[int],
                 add_bos: bool, pad_id: int | None = None, name: str = "tokenizer",
                 chat_template: str | None = None, byte_level: bool = True) -> None:
        tokenizers = _require_tokenizers()
        # Two copies: one that reads special-token text as the token, one that reads it as plain text, so
        # encoding never flips a shared flag (the web app encodes from several threads).
        self._special = backend
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self.name = name
        self.n_words: int = backend.get_vocab_size(with_added_tokens=True)
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos = add_bos
        self.stop_tokens: list[int] = list(dict.fromkeys(int(t) for t in stop_ids))
        self.chat_template = chat_template
        self._byte_level = byte_level
        self._bytes: dict[int, bytes] = {}
        self._byte_decoder = _byte_decoder()
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True))) \
            if self.special_tokens else None

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, n_words={self.n_words})"

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_gguf_spec(cls, spec: TokenizerSpec, *, name: str = "gguf") -> "HFTokenizer":
        tokenizers = _require_tokenizers()
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

        if spec.model != "gpt2":
            raise ValueError(f"{name}: tokenizer model {spec.model!r} is not supported; the GGUF reader builds byte-level "
                             "BPE tokenizers (tokenizer.ggml.model 'gpt2', as Llama 3 and SmolLM use)")
        splits = PRE_TOKENIZERS.get(spec.pre or "default")
        if splits is None:
            raise ValueError(f"{name}: pre-tokenizer {spec.pre!r} is not supported; supported: "
                             f"{', '.join(sorted(PRE_TOKENIZERS))}")
        vocab = {tok: i for i, tok in enumerate(spec.tokens)}
        if len(vocab) != len(spec.tokens):
            raise ValueError(f"{name}: the vocabulary lists some tokens twice")
        merges = [tuple(m.split(" ", 1)) for m in spec.merges]
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                                  ignore_merges=spec.pre in ("llama-bpe", "llama3", "llama-v3")))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        alphabet = set(_byte_decoder())
        types = spec.token_types or [1] * len(spec.tokens)
        # Control tokens are special; user-defined ones are matched whole but are not special (llama.cpp's rule).
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(spec.tokens, types) if ty == CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(spec.tokens, types) if ty == USER_DEFINED and not set(t) <= alphabet])
        stops = [t for t in (spec.eos_id, spec.eot_id, spec.eom_id) if t is not None]
        for text in END_TOKENS:
            if text in vocab and types[vocab[text]] == CONTROL:
                stops.append(vocab[text])
        return cls(backend, bos_id=spec.bos_id, eos_id=spec.eos_id, stop_ids=stops, add_bos=spec.add_bos,
                   pad_id=spec.pad_id, name=name, chat_template=spec.chat_template)

    @classmethod
    def from_files(cls, tokenizer_json: str | Path) -> "HFTokenizer":
        """An HF ``tokenizer.json``, with ``tokenizer_config.json`` beside it when present."""
        tokenizers = _require_tokenizers()
        path = Path(tokenizer_json)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"cannot read {path} as an HF tokenizer.json: {e}") from None
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}

        def token_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        stops = [t for t in (eos,) if t is not None]
        for text in END_TOKENS:
            tid = backend.token_to_id(text)
            if tid is not None:
                stops.append(tid)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        byte_level = "ByteLevel" in backend.to_str()[:20000]
        return cls(backend, bos_id=bos, eos_id=eos, stop_ids=stops, add_bos=bool(config.get("add_bos_token", False)),
                   pad_id=token_id("pad_token"), name=str(path), chat_template=template, byte_level=byte_level)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special: AllowedSpecial = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = ()) -> list[int]:
        """Token ids of ``s`` (BOS/EOS when asked). Special-token text is plain text unless allowed."""
        if not isinstance(s, str):
            raise TypeError(f"HFTokenizer.encode expects a str, got {type(s).__name__}")
        if allowed_special is None or allowed_special == "none":
            allowed: AbstractSet[str] = frozenset()
        elif allowed_special == "all":
            allowed = self.special_tokens.keys()
        else:
            allowed = frozenset(allowed_special)
            unknown = set(allowed) - self.special_tokens.keys()
            if unknown:
                raise ValueError(f"allowed_special names unknown special tokens: {sorted(unknown)}")
        if disallowed_special and self._special_re is not None:
            banned = set(self.special_tokens) - set(allowed) if disallowed_special == "all" else set(disallowed_special)
            found = sorted({m.group(0) for m in self._special_re.finditer(s)} & banned)
            if found:
                raise ValueError(f"text contains disallowed special token(s) {found}")
        ids: list[int] = []
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.name} has no BOS token; encode with bos=False")
            ids.append(self.bos_id)
        if allowed and self._special_re is not None and len(allowed) == len(self.special_tokens):
            ids += self._special.encode(s, add_special_tokens=False).ids
        elif allowed and self._special_re is not None:
            start = 0
            for m in self._special_re.finditer(s):
                if m.group(0) in allowed:
                    ids += self._plain.encode(s[start:m.start()], add_special_tokens=False).ids if m.start() > start else []
                    ids.append(self.special_tokens[m.group(0)])
                    start = m.end()
            if start < len(s):
                ids += self._plain.encode(s[start:], add_special_tokens=False).ids
        elif s:
            ids += self._plain.encode(s, add_special_tokens=False).ids
        if eos:
            if self.eos_id is None:
                raise ValueError(f"{self.name} has no EOS token; encode with eos=False")
            ids.append(self.eos_id)
        return ids

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        return check_ids(ids, self.n_words)

    def token_bytes(self, token_id: int) -> bytes:
        b = self._bytes.get(token_id)
        if b is None:
            text = self._special.id_to_token(token_id) or ""
            if self._byte_level and token_id not in self.special_tokens.values() and set(text) <= self._byte_decoder.keys():
                b = bytes(self._byte_decoder[c] for c in text)
            elif self._byte_level:
                b = text.encode("utf-8")
            else:
                b = self._special.decode([token_id], skip_special_tokens=False).encode("utf-8")
            self._bytes[token_id] = b
        return b

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(t) for t in self._check_ids(ids))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens as their names; bytes that are not UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
