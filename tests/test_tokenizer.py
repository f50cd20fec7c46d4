"""Tokenizer and chat format vs Meta's reference (llama-models), plus error paths.

Tests that compare with the reference need the llama-models package (its Python code and its
tokenizer.model); the error and validation tests run on a tiny byte-level BPE file instead.
"""

from __future__ import annotations

import codecs
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llama3 import tokenizer as tokenizer_module
from llama3.tokenizer import ChatFormat, Tokenizer, default_tokenizer_path

# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def ref_tok():
    pytest.importorskip("llama_models")
    from llama_models.llama3.tokenizer import Tokenizer as RefTokenizer

    return RefTokenizer(default_tokenizer_path())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    pytest.importorskip("llama_models")  # the real tokenizer.model ships inside it
    return Tokenizer(default_tokenizer_path())


@pytest.fixture(scope="module")
def ref_fmt(ref_tok):
    pytest.importorskip("PIL")  # llama-models' chat_format imports PIL
    from llama_models.llama3.chat_format import ChatFormat as RefChatFormat

    return RefChatFormat(ref_tok)


def _write_byte_bpe(path: Path) -> Path:
    """A minimal valid tiktoken BPE file: the 256 single bytes, ranks 0..255."""
    import base64

    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


@pytest.fixture
def tiny_tok(tmp_path) -> Tokenizer:
    return Tokenizer(_write_byte_bpe(tmp_path / "tokenizer.model"))


# ---------------------------------------------------------------------------------------------
# texts

SHORT_TEXTS = {
    "empty": "",
    "space": " ",
    "newline": "\n",
    "ascii": "This is a test sentence. The quick brown fox jumps over the lazy dog!",
    "contractions": "I'm sure you'LL see they'd've said it's WE'RE, can't won't",
    "numbers": "3.14159 1234567890 1,000,000 -42 0x1F 1e-10 ١٢٣ ⅷ 12345678901234567890",
    "latin": "Grüße aus Köln — naïve café, ĳsselmeer, façade, Ærøskøbing",
    "cjk": "我爱自然语言处理。日本語のテキストも、カタカナも。한국어 문장입니다.",
    "rtl_indic": "مرحبا بالعالم! שלום עולם. नमस्ते दुनिया। வணக்கம் உலகம்",
    "cyrillic_greek_thai": "Привет, мир! Γειά σου Κόσμε. สวัสดีชาวโลก",
    "emoji": "😀 👍🏽 👩‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 🫠 ❤️ 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "code": (
        "def f(x):\n\tif x:\n\t\treturn x ** 2  # square\r\n    else:\n        return None\n\n\n"
        'print(f"{f(3)=}")\t\t// done;\nint main() { return a[i]->b != c && d <= e; }\n'
    ),
    "odd_whitespace": "a\u00a0b\u2003c\u3000d \t\n\x0b\x0c\r\n  \n\n\n   e\u2028f\u0085g   ",
    "special_text": (
        "<|begin_of_text|>hi<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "<|reserved_special_token_5|> <|python_tag|><|image|><|end_of_text|>"
    ),
    "control_chars": "\x00\x01\x7f tab\there \u200b\u200d\ufeff end",
}


def _long_texts() -> dict[str, str]:
    rng = random.Random(0)
    words = ["the", "Köln", "数据", "😀", "123", "x=y;", "\n", "\t", "  ", "naïve", "👩‍👧"]
    mixed = "".join(rng.choice(words) + (" " if rng.random() < 0.7 else "") for _ in range(90_000))
    # > 400k characters, with a long non-space run straddling the 400,000-character cut.
    over_400k = (mixed * 2)[:399_990] + "abcdefghijklmnopqrstuvwxyz" * 3 + " tail 😀" * 1000
    return {
        "ws_run_30k": " " * 30_000 + "x",
        "runs_around_25k": (
            "a" * 60_001 + " " * 25_001 + "b" * 25_000
            + "\n" * 50_002 + "c" * 24_999 + "\t" * 25_000
        ),
        "mixed_ws_runs": "word" + " \t\n" * 12_000 + "end" + "\u3000" * 26_000 + "é" * 26_000,
        "over_400k": over_400k,
    }


LONG_TEXTS = _long_texts()
assert len(LONG_TEXTS["over_400k"]) > 400_000


# ---------------------------------------------------------------------------------------------
# tokenizer vs reference


def test_special_tokens_and_ids_match_reference(tok, ref_tok):
    assert tok.special_tokens == ref_tok.special_tokens
    assert len(tok.special_tokens) == 256
    assert tok.n_words == ref_tok.n_words == 128_256
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id) == (
        ref_tok.bos_id,
        ref_tok.eos_id,
        ref_tok.eot_id,
        ref_tok.eom_id,
    ) == (128000, 128001, 128009, 128008)
    assert tok.pad_id == ref_tok.pad_id == tok.special_tokens["<|finetune_right_pad_id|>"]
    assert tok.stop_tokens == ref_tok.stop_tokens
    assert tok.pat_str == ref_tok.pat_str
    assert tok.model_path == default_tokenizer_path()


@pytest.mark.parametrize("bos,eos", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("name", sorted(SHORT_TEXTS))
def test_encode_decode_match_reference(tok, ref_tok, name, bos, eos):
    text = SHORT_TEXTS[name]
    ids = tok.encode(text, bos=bos, eos=eos)
    assert ids == ref_tok.encode(text, bos=bos, eos=eos)
    assert tok.decode(ids) == ref_tok.decode(ids)
    body = ids[int(bos) : len(ids) - int(eos)]
    assert tok.decode(body) == text


@pytest.mark.parametrize("name", sorted(LONG_TEXTS))
def test_long_inputs_match_reference(tok, ref_tok, name):
    text = LONG_TEXTS[name]
    ids = tok.encode(text, bos=True, eos=True)
    assert ids == ref_tok.encode(text, bos=True, eos=True)
    assert tok.decode(ids[1:-1]) == text


def test_chunking_changes_tokens(tok):
    """The 25k-run cut is observable: a 30k space run does not encode like tiktoken alone."""
    text = " " * 30_000 + "x"
    assert tok.encode(text, bos=False, eos=False) != tok.model.encode(text, disallowed_special=())


def test_run_splitting_matches_reference_exactly(ref_tok):
    """Our regex-based run cutter yields the same pieces as Meta's per-character loop."""
    rng = random.Random(1)
    alphabet = [" ", "\t", "\n", "\u3000", "a", "b", "é", "😀"]
    for _ in range(300):
        s = "".join(
            rng.choice(alphabet[:4] if rng.random() < 0.5 else alphabet[4:]) * rng.randint(1, 9)
            for _ in range(rng.randint(0, 12))
        )
        for max_run in (1, 2, 3, 5):
            # Short strings take the no-cut fast path, longer ones the regex scan.
            ours = list(tokenizer_module._split_long_runs(s, max_run))
            theirs = list(ref_tok._split_whitespaces_or_nonwhitespaces(s, max_run))
            assert ours == theirs, (s, max_run)


def test_special_token_text_handling_matches_reference(tok, ref_tok):
    text = "Hello<|eot_id|> and <|begin_of_text|>"
    plain = tok.encode(text, bos=False, eos=False)
    assert tok.eot_id not in plain and tok.bos_id not in plain
    assert tok.decode(plain) == text
    for allowed in ("all", {"<|eot_id|>"}):
        ids = tok.encode(text, bos=False, eos=False, allowed_special=allowed)
        assert ids == ref_tok.encode(text, bos=False, eos=False, allowed_special=allowed)
    assert tok.encode(text, bos=False, eos=False, allowed_special="all").count(tok.eot_id) == 1
    assert tok.encode(text, bos=False, eos=False, allowed_special="none") == plain
    with pytest.raises(ValueError):
        tok.encode(text, bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError):
        ref_tok.encode(text, bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode(text, bos=False, eos=False, allowed_special={"<|not_a_token|>"})


def test_decode_special_ids_match_reference(tok, ref_tok):
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128009, 128011, 128255, 128001]
    assert tok.decode(ids) == ref_tok.decode(ids)
    assert tok.decode(ids).startswith("<|begin_of_text|>This is a test sentence.<|eot_id|>")


def test_decode_bytes_on_split_multibyte_char(tok):
    text = "ok 🫠 龘"
    ids = tok.encode(text, bos=False, eos=False)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == tok.decode_bytes(ids) == text.encode("utf-8")
    # At least one token ends inside a character: decode() of that prefix shows U+FFFD while
    # the bytes are kept exactly, and an incremental UTF-8 decoder reassembles the text.
    cut = next(k for k in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:k]))
    assert tok.decode_bytes(ids[:cut]) == text.encode("utf-8")[: len(tok.decode_bytes(ids[:cut]))]
    dec = codecs.getincrementaldecoder("utf-8")()
    assert "".join(dec.decode(p) for p in pieces) + dec.decode(b"", final=True) == text


def test_encode_accepts_empty_and_rejects_non_str(tok):
    assert tok.encode("", bos=False, eos=False) == []
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]
    assert tok.decode([]) == "" and tok.decode_bytes([]) == b""
    with pytest.raises(TypeError):
        tok.encode(b"bytes", bos=False, eos=False)  # type: ignore[arg-type]


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([1, tok.n_words])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode_bytes([-1])


# ---------------------------------------------------------------------------------------------
# chat format vs reference

DIALOGS = {
    "empty": [],
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ],
    "multi_turn": [
        {"role": "system", "content": "You are a helpful assistant. Réponds en français."},
        {"role": "user", "content": "Bonjour ! 👋 Écris une fonction:\n\tdef f(): pass"},
        {"role": "assistant", "content": "Voici:\n```python\ndef f():\n    return 42\n```"},
        {"role": "user", "content": "Merci. 谢谢。 <|eot_id|><|start_header_id|>system"},
    ],
    "ipython": [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "Compute 2**10"},
        {"role": "assistant", "content": "print(2**10)"},
        {"role": "ipython", "content": "1024"},
    ],
    "empty_content": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
}

PADDED_DIALOG = [
    {"role": "system", "content": "  \n You are terse.\n\n"},
    {"role": "user", "content": "\tHi there   "},
]


def _ref_messages(dialog):
    from llama_models.datatypes import RawMessage

    # llama-models names the tool-result role "tool" and renders it as "ipython".
    return [
        RawMessage(role="tool" if m["role"] == "ipython" else m["role"], content=m["content"])
        for m in dialog
    ]


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_dialog_prompt_matches_reference(tok, ref_fmt, name):
    dialog = DIALOGS[name]
    ours = ChatFormat(tok).encode_dialog_prompt(dialog)
    assert ours == ref_fmt.encode_dialog_prompt(_ref_messages(dialog)).tokens
    assert ours[0] == tok.bos_id
    assert ours[-4:] == ChatFormat(tok).encode_header("assistant")
    assert ours.count(tok.eot_id) == len(dialog)  # special-token text in content stays plain


def test_message_and_header_match_reference(tok, ref_fmt):
    from llama_models.datatypes import ToolPromptFormat

    fmt = ChatFormat(tok)
    for dialog in DIALOGS.values():
        for msg, ref_msg in zip(dialog, _ref_messages(dialog)):
            ref_tokens, _images = ref_fmt.encode_message(ref_msg, ToolPromptFormat.json)
            assert fmt.encode_message(msg) == ref_tokens
    for role in ("system", "user", "assistant", "ipython"):
        assert fmt.encode_header({"role": role, "content": ""}) == ref_fmt._encode_header(role)
    assert fmt.encode_header("tool") == fmt.encode_header("ipython")
    assert fmt.encode_message({"role": "user", "content": "This is a test sentence."}) == [
        128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
    ]  # fmt: skip


def test_content_stripping(tok, ref_fmt):
    """Default strips content (Meta's llama3 repo, HF templates); strip_content=False matches
    llama-models, which does not strip."""
    stripped = [{**m, "content": m["content"].strip()} for m in PADDED_DIALOG]
    assert ChatFormat(tok).encode_dialog_prompt(PADDED_DIALOG) == ref_fmt.encode_dialog_prompt(
        _ref_messages(stripped)
    ).tokens
    raw = ChatFormat(tok, strip_content=False).encode_dialog_prompt(PADDED_DIALOG)
    assert raw == ref_fmt.encode_dialog_prompt(_ref_messages(PADDED_DIALOG)).tokens
    assert raw != ChatFormat(tok).encode_dialog_prompt(PADDED_DIALOG)


def test_decode_assistant_message(tok):
    fmt = ChatFormat(tok)
    reply = tok.encode("Paris is the capital. 🇫🇷", bos=False, eos=False)
    for stop in tok.stop_tokens:
        assert fmt.decode_assistant_message(reply + [stop, 11, 12]) == "Paris is the capital. 🇫🇷"
    assert fmt.decode_assistant_message(reply) == "Paris is the capital. 🇫🇷"


# ---------------------------------------------------------------------------------------------
# errors (no llama-models needed)


def test_missing_file_error(tmp_path):
    path = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as err:
        Tokenizer(path)
    assert str(path) in str(err.value) and "tiktoken" in str(err.value)
    with pytest.raises(IsADirectoryError, match="directory"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content,match",
    [
        ("IQ== 0\nthis-is-not-base64!! 1\n", "line 2"),
        ("IQ== 0\nIg==\n", "line 2"),
        ("IQ== 0\nIg== one\n", "line 2"),
        ("IQ== 0\nIg== 5\n", "not exactly 0..1"),
        ("IQ== 0\nIQ== 1\n", "appears twice"),
        ("\n\n", "no BPE ranks"),
    ],
)
def test_malformed_file_errors(tmp_path, content, match):
    path = tmp_path / "tokenizer.model"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        Tokenizer(path)


def test_sentencepiece_file_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\xff\xfe")
    with pytest.raises(ValueError, match="SentencePiece"):
        Tokenizer(path)


def test_tiny_tokenizer_layout(tiny_tok):
    assert tiny_tok.n_words == 256 + 256
    assert tiny_tok.bos_id == 256 and tiny_tok.eot_id == 256 + 9
    ids = tiny_tok.encode("héllo\n", bos=True, eos=False)
    assert ids == [256, *"héllo\n".encode()]
    assert tiny_tok.decode(ids) == "<|begin_of_text|>héllo\n"


@pytest.mark.parametrize(
    "dialog,match",
    [
        ([{"role": "robot", "content": "hi"}], r"dialog\[0\] has role 'robot'"),
        ([{"role": "user", "content": "a"}, {"role": "User", "content": "b"}], r"dialog\[1\]"),
        ([{"role": "user", "content": ["a", "b"]}], "content must be a str"),
        ([{"role": "user", "content": None}], "content must be a str"),
        ([{"role": "user"}], "missing"),
        ([{"role": "user", "content": "hi", "name": "bob"}], "unexpected"),
        (["hello"], "must be a dict"),
        ({"role": "user", "content": "hi"}, "must be a list"),
        ("hello", "must be a list"),
    ],
)
def test_bad_dialog_errors(tiny_tok, dialog, match):
    with pytest.raises(ValueError, match=match):
        ChatFormat(tiny_tok).encode_dialog_prompt(dialog)


def test_bad_header_role(tiny_tok):
    with pytest.raises(ValueError, match="role"):
        ChatFormat(tiny_tok).encode_header("narrator")


# ---------------------------------------------------------------------------------------------
# default path


def test_default_path_missing_package(monkeypatch):
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install llama-models"):
        default_tokenizer_path()


def test_default_path_does_not_import_llama_models():
    pytest.importorskip("llama_models")
    # Load the module file directly so the llama3 package __init__ (torch etc.) stays out of it.
    code = (
        "import importlib.util, sys\n"
        f"path = {str(Path(tokenizer_module.__file__))!r}\n"
        "spec = importlib.util.spec_from_file_location('tok', path)\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "t = m.Tokenizer(m.default_tokenizer_path())\n"
        "assert t.encode('hi', bos=True, eos=False) == [128000, 6151]\n"
        "assert not any(k.split('.')[0] == 'llama_models' for k in sys.modules), 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
