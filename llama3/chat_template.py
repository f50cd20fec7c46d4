"""Chat prompts from a checkpoint's own jinja chat template, and the one place that picks a chat format.

``TemplateChatFormat`` renders the template (GGUF ``tokenizer.chat_template`` or ``tokenizer_config.json``)
the way transformers' ``apply_chat_template`` does: jinja2's immutable sandbox (a template cannot reach
Python objects or change state), ``trim_blocks`` / ``lstrip_blocks``, ``raise_exception`` and
``strftime_now`` helpers, ``bos_token`` / ``eos_token`` in scope; the rendered text is then tokenized with
special-token text read as the special tokens (the template writes them). ``chat_format_for`` gives every
caller the right format for its tokenizer, so nothing above ``llama3`` knows which one it has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

from .tokenizer import ChatFormat, Message, Tokenizer

__all__ = ["TemplateChatFormat", "NoChatFormat", "chat_format_for", "render_chat_template"]


class TemplateError(ValueError):
    """The chat template refused the dialog (its raise_exception) or could not be rendered."""


def _raise(message: str):
    raise TemplateError(f"the model's chat template refused this dialog: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the model's chat template does not parse: {e}") from None


def render_chat_template(template: str, dialog: Sequence[Message], *, add_generation_prompt: bool = True,
                         **variables) -> str:
    """The template rendered for ``dialog`` (a list of {"role", "content"} messages)."""
    import jinja2

    try:
        return _compile(template).render(messages=[dict(m) for m in dialog],
                                         add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"the model's chat template failed on this dialog: {e}") from None


def _validate(dialog: object) -> list[Message]:
    if isinstance(dialog, (str, bytes, Mapping)) or not isinstance(dialog, Sequence):
        raise ValueError(f"dialog must be a list of {{'role': ..., 'content': ...}} dicts, got {type(dialog).__name__}")
    for i, m in enumerate(dialog):
        if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
            raise ValueError(f"dialog[{i}] must be a dict with exactly the keys 'role' and 'content'")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"dialog[{i}] role must be a non-empty str")
        if not isinstance(m["content"], str):
            raise ValueError(f"dialog[{i}] ({m['role']}) content must be a str, got {type(m['content']).__name__}")
    return list(dialog)


class TemplateChatFormat:
    """Chat prompts from a jinja chat template; stop tokens are the tokenizer's."""

    def __init__(self, tokenizer, template: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        _compile(template)  # a broken template fails at load, not at the first chat

    def _variables(self) -> dict[str, str]:
        tok = self.tokenizer
        names = {v: k for k, v in tok.special_tokens.items()}
        return {"bos_token": names.get(tok.bos_id, ""), "eos_token": names.get(tok.eos_id, "")}

    def render(self, dialog: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.template, _validate(dialog), add_generation_prompt=add_generation_prompt,
                                    **self._variables())

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        """Prompt tokens for a dialog, ending where the assistant's reply starts."""
        return self.tokenizer.encode(self.render(dialog), bos=False, eos=False, allowed_special="all")

    def decode_assistant_message(self, tokens: Sequence[int]) -> str:
        stops = set(self.tokenizer.stop_tokens)
        end = next((i for i, t in enumerate(tokens) if int(t) in stops), len(tokens))
        return self.tokenizer.decode(tokens[:end])


class NoChatFormat:
    """For a base model without a chat template: any chat use says so."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        raise ValueError(f"{self.tokenizer!r} has no chat template (a base model?); use text completion "
                         "(llama3-sae complete) instead of chat")

    def decode_assistant_message(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)


def chat_format_for(tokenizer):
    """Llama 3's header format for the tiktoken tokenizer; the checkpoint's own template otherwise."""

    template = getattr(tokenizer, "chat_template", None)
    if template:
        return TemplateChatFormat(tokenizer, template)
    if isinstance(tokenizer, Tokenizer):
        return ChatFormat(tokenizer)
    return NoChatFormat(tokenizer)
