"""Typed configs as the one source of command-line options.

Every stage describes its options as a dataclass with a docstring under each field. This module turns
such a class into argparse options (help text = the field docstring, default shown), reads the values
back into an instance (``__post_init__`` validates), and loads/saves the same object as JSON, so
``--help``, config files and saved run configs never disagree.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each field of a dataclass (also for its base classes)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = plain_text(" ".join(nxt.value.value.split()))
    return docs


def plain_text(text: str) -> str:
    """Docstring markup made readable in a terminal: ``code`` -> code (help texts come from docstrings)."""
    return re.sub(r"``([^`]+)``", r"\1", text)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one option per dataclass field. Fields named in ``skip`` are left for the caller (positionals)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = docs.get(f.name, "")
        if has_default and default is not None and default != [] and default != ():
            help_text += f" (default: {_show(default)})"
        # argparse expands %-formats in help; a literal % in a docstring must not crash --help.
        kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%") or None, "dest": f.name, "default": argparse.SUPPRESS}
        if not has_default:
            kwargs["required"] = True
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            choices = typing.get_args(tp)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif origin in (list, tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            if f.metadata.get("one_per_flag"):
                # One value per flag, repeated for more (--steer 1=3 --steer 2=4), so that the positional
                # arguments may come after it: --steer 1=3 "a prompt".
                kwargs.update(type=_scalar(item), action="append")
            else:  # repeated flags accumulate (--data a b --data c keeps all three)
                kwargs.update(nargs="+", type=_scalar(item), action="extend")
        else:
            kwargs["type"] = _scalar(tp)
            if optional:
                kwargs["metavar"] = f"{getattr(tp, '__name__', 'VALUE').upper()}"
        parser.add_argument(_flag(f.name), **kwargs)
    for old_name, new_name in renamed_options(cls).items():
        target = parser._option_string_actions[_flag(new_name)]
        flags = {_flag(old_name): _flag(new_name)}
        if isinstance(target, argparse.BooleanOptionalAction):
            flags["--no-" + _flag(old_name)[2:]] = "--no-" + _flag(new_name)[2:]
        parser.add_argument(*flags, dest=new_name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            action=_deprecated(flags, target))


def renamed_options(cls: type) -> dict[str, str]:
    """Old option names a config class still accepts for one version: its ``RENAMED`` {old: new} (and its
    bases'). The old flag works, says it is deprecated, and is hidden from --help."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(getattr(klass, "RENAMED", {}) or {})
    return out


def _deprecated(flags: dict[str, str], target: argparse.Action) -> type[argparse.Action]:
    """An action that parses like ``target`` (the new option) and warns that its flag is the old name
    (``flags``: old flag -> the new flag it stands for)."""

    class Deprecated(argparse.Action):
        def __init__(self, option_strings, dest, **kwargs):
            kwargs.pop("nargs", None)
            nargs = 0 if isinstance(target, argparse.BooleanOptionalAction) else target.nargs
            super().__init__(option_strings, dest, nargs=nargs, type=target.type, choices=target.choices, **kwargs)

        def __call__(self, parser, namespace, values, option_string=None):
            new = flags[option_string]
            print(f"warning: {option_string} is deprecated and will be removed in the next version: use {new}",
                  file=sys.stderr)
            target(parser, namespace, values, new)

    return Deprecated


def _scalar(tp: Any) -> Any:
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return Path
    return str


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(repr(v) if isinstance(v, str) else str(v) for v in value)
    return str(value)


def from_namespace(cls: type[T], ns: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from parsed options; values given on the command line override ``base``."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = dict(base or {})
    values.update({k: v for k, v in vars(ns).items() if k in names})
    hints = typing.get_type_hints(cls)
    for k, v in list(values.items()):
        tp, _ = _unwrap_optional(hints[k])
        if typing.get_origin(tp) is tuple and isinstance(v, list):
            values[k] = tuple(v)
        if tp is Path and isinstance(v, str):
            values[k] = Path(v)
    return cls(**values)


def to_jsonable(cfg: Any) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(cfg), indent=2) + "\n")
    tmp.replace(path)


def load_config(cls: type[T], path: str | Path, **overrides: Any) -> T:
    raw = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{path}: unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
    raw.update(overrides)
    ns = argparse.Namespace(**raw)
    return from_namespace(cls, ns)


def parse_config(cls: type, argv: list[str] | None, prog: str, description: str, epilog: str = "", *,
                 positional: dict[str, str] | None = None, usage_errors: bool = False) -> Any:
    """argparse options from the dataclass ``cls``; ``--config FILE`` (JSON, e.g. a saved run config)
    gives values that the command line overrides. Every command parses this way.

    positional: fields taken as trailing positional arguments instead of options ({name: help}; a tuple
    field takes any number). usage_errors: an invalid value exits with argparse's usage message (the
    interactive commands), instead of raising the ValueError for the caller to print as one line."""
    positional = positional or {}
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(description), epilog=plain_text(epilog),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON file of option values (names as in --help with underscores, e.g. a saved "
                             "run config); options on the command line override it")
    add_dataclass_args(parser, cls, skip=tuple(positional))
    hints = typing.get_type_hints(cls)
    for name, help_text in positional.items():
        tp, _ = _unwrap_optional(hints[name])
        if typing.get_origin(tp) in (list, tuple):
            parser.add_argument(name, nargs="*", help=help_text)
        else:  # one value (e.g. a latent index), required unless --config gives it
            parser.add_argument(name, nargs="?", type=_scalar(tp), default=None, help=help_text)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    config_path = pre.parse_known_args(argv)[0].config
    base = None
    if config_path is not None:
        try:
            base = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--config {config_path}: {e}")
        if not isinstance(base, dict):
            parser.error(f"--config {config_path}: expected a JSON object of option values")
        for old_name, new_name in renamed_options(cls).items():
            if old_name in base and new_name not in base:
                print(f"warning: --config {config_path}: {old_name} is deprecated, read as {new_name}",
                      file=sys.stderr)
                base[new_name] = base.pop(old_name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(base) - known)
        if unknown:
            parser.error(f"--config {config_path}: unknown options {unknown}; known: {sorted(known)}")
        for action in parser._actions:  # options the file gives are no longer required on the command line
            if action.dest in base:
                action.required = False
    # Intermixed: prompts may come before, between or after options (llama3-sae complete "a" --steer 1=3 "b").
    ns = parser.parse_intermixed_args(argv)
    for name in positional:  # positional values add to what --config gives
        given = getattr(ns, name)
        if given in (None, []) and base and name in base:
            setattr(ns, name, base.pop(name))
        elif given is None:
            parser.error(f"the {name} is required (e.g. {prog} ... 12)")
    try:
        return from_namespace(cls, ns, base)
    except ValueError as e:
        if usage_errors:
            parser.error(str(e))
        raise


def config_identity(cfg: Any, free: set[str]) -> dict[str, Any]:
    """The fields of ``cfg`` that decide a job's result (all but ``free``), with paths resolved: what a
    resumed run must match. ``free`` names options that may change between attempts (device, budgets)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name in free:
            continue
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v.resolve())
        elif isinstance(v, tuple):
            v = [str(Path(x).resolve()) if isinstance(x, Path) else x for x in v]
        out[f.name] = v
    return out


def identity_differences(then: dict[str, Any], now: dict[str, Any]) -> str:
    """The options in which two ``config_identity`` records differ, as "name: then-value -> now-value; ..."
    (empty when they agree): what a refused resume tells the user."""
    keys = sorted(set(then) | set(now))
    return "; ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in keys if then.get(k) != now.get(k))
