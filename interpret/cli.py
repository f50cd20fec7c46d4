"""Entry points of the interpretation commands; ``apps.cli`` wires them into ``llama3-sae``.

- ``main_top_examples``: ``llama3-sae top-examples``, top-activating examples for every latent.
- ``main_interpret``: ``llama3-sae interpret``, labels from Claude (or ``--heuristic``).
- ``main_score``: ``llama3-sae score``, detection scoring of the labels.

Each takes ``(argv, prog)`` and returns an exit code: 0 done, 1 declined at the confirmation,
2 bad input or an API error (state is saved: rerun to continue), 3 finished with some failed requests.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from rich.console import Console

from llama3_sae.config import add_dataclass_args, from_namespace, save_config
from llama3_sae.errors import USER_ERRORS, describe

from .batch_client import ResultsStreamError
from .config import InterpretConfig, ScoreConfig
from .examples import TopExamplesConfig, run_top_examples
from .labels import run_interpret
from .scoring import run_score


def _parse(cls: type, argv: list[str] | None, prog: str, description: str | None) -> Any:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_dataclass_args(parser, cls)
    ns = parser.parse_args(argv)
    try:
        return from_namespace(cls, ns)
    except ValueError as e:
        parser.error(str(e))


def _run_llm_job(run: Callable[..., int], cfg: Any, name: str) -> int:
    console = Console(stderr=True)
    if not cfg.sae.is_dir():
        raise SystemExit(f"--sae {cfg.sae}: no such directory")
    try:
        import anthropic
    except ImportError:
        anthropic = None  # only --heuristic works without it; make_client says so otherwise
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.workdir / f"{name}.config.json")
    try:
        return run(cfg, console=console)
    except ResultsStreamError as e:
        console.print(f"[red]{prog_name(name)}: {e}[/]")
        return 2
    except Exception as e:  # noqa: BLE001 - only API errors are caught here; the rest is re-raised
        if anthropic is None or not isinstance(e, anthropic.APIError):
            raise
        status = getattr(e, "status_code", None)
        # The SDK's message holds the server's error text, never the request headers (so never the key).
        console.print(f"[red]{prog_name(name)}: Anthropic API error{f' (HTTP {status})' if status else ''}: "
                      f"{type(e).__name__}: {getattr(e, 'message', e)}[/]")
        if status in (401, 403):
            console.print("check ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL if set)")
        console.print(f"progress is saved in {cfg.workdir}; rerun the same command to continue")
        return 2


def prog_name(name: str) -> str:
    return {"labels": "llama3-sae interpret", "score": "llama3-sae score"}.get(name, name)


def main_interpret(argv: list[str] | None = None, prog: str = "llama3-sae interpret") -> int:
    """Label latents from their top examples with Claude (Message Batches), or with --heuristic."""

    cfg = _parse(InterpretConfig, argv, prog, InterpretConfig.__doc__)
    return _run_llm_job(run_interpret, cfg, "labels")


def main_score(argv: list[str] | None = None, prog: str = "llama3-sae score") -> int:
    """Detection-score the labels in latents.jsonl with Claude; summary table and histogram."""

    cfg = _parse(ScoreConfig, argv, prog, ScoreConfig.__doc__)
    return _run_llm_job(run_score, cfg, "score")


def main_top_examples(argv: list[str] | None = None, prog: str = "llama3-sae top-examples") -> int:
    """Top-activating documents of every latent of an SAE over a text source, written beside the SAE."""

    cfg = _parse(TopExamplesConfig, argv, prog, TopExamplesConfig.__doc__)
    run_top_examples(cfg)
    return 0


COMMANDS = {"top-examples": main_top_examples, "interpret": main_interpret, "score": main_score}


def main(argv: list[str] | None = None) -> int:
    """``python -m interpret COMMAND ...``: the same commands without the ``llama3-sae`` launcher."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m interpret {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:], prog=f"python -m interpret {argv[0]}")
    except USER_ERRORS as e:
        print(f"{argv[0]}: error: {describe(e)}", file=sys.stderr)
        return 2
