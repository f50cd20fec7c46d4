"""``llama3-sae chat``: an interactive chat in the terminal, with history, the Llama 3 chat format,
optional steering and a live panel of the top active SAE latents.

Commands at the prompt: /steer SPEC [SPEC ...] [when CONDITION] (e.g. /steer 896=20, or /steer 896=20
when 12>0.75 to steer only at the tokens where latent 12 is above 0.75), /unsteer [LATENT ...],
/reset (forget the conversation), /help, /quit (or Ctrl-D). Ctrl-C stops a reply being generated.
Without a terminal, lines are read from stdin and the replies printed plainly, one per line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from rich.console import Console
from rich.markup import escape

from llama3.generation import Message
from sae import Edit

from llama3_sae.config import parse_config
from .engine import Engine, ModelOptions, SaeOptions, Sampling, SamplingOptions
from .terminal import StreamView, describe_edit, make_console

HELP = ("/steer SPEC [SPEC ...]  steer a latent (896=20 adds 20; 896:set=5, 896:zero, 896:clamp=0..8)\n"
        "  ... when CONDITION     only where the condition holds (/steer 896=20 when 12>0.75 & 5<1)\n"
        "/unsteer [LATENT ...]   stop steering those latents (all when none given)\n"
        "/reset                  forget the conversation\n"
        "/help                   this text\n"
        "/quit                   leave (or Ctrl-D)")


@dataclass
class ChatConfig(SamplingOptions, SaeOptions, ModelOptions):
    system: str | None = None
    """A system message put at the start of the conversation."""
    fps: float = 12.0
    """Most screen refreshes per second of the live view (a terminal only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")


class ChatSession:
    """The conversation and the steering of one chat; the engine is only borrowed for each reply."""

    def __init__(self, engine: Engine, cfg: ChatConfig, console: Console, edits: list[Edit]):
        self.engine = engine
        self.cfg = cfg
        self.console = console
        self.edits = edits
        self.history: list[Message] = []

    def dialog(self, user: str) -> list[Message]:
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        return [*system, *self.history, {"role": "user", "content": user}]

    def reply(self, user: str) -> str | None:
        """Stream the assistant's answer to ``user``; it joins the history only when it finished."""
        tokens = self.engine.encode_dialog(self.dialog(user))
        view = StreamView(self.console, ["assistant"], catalog=self.engine.catalog, edits=self.edits,
                          show_latents=self.cfg.latents > 0, fps=self.cfg.fps, title="chat", chat=True)
        steps = self.engine.stream([tokens], Sampling.of(self.cfg), self.edits, top_latents=self.cfg.latents)
        try:
            text = view.run(steps)[0]
        except KeyboardInterrupt:
            steps.close()  # frees the model now rather than when the generator is collected
            self.console.print("[yellow](reply interrupted; not added to the conversation)[/]")
            return None
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text

    def command(self, line: str) -> bool:
        """Run a /command; False when the chat should end."""
        name, _, rest = line.strip().partition(" ")
        args = rest.split()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.history.clear()
            self.console.print("conversation cleared")
        elif name == "/help":
            self.console.print(escape(HELP))
        elif name == "/steer":
            if not args:
                raise ValueError("/steer needs at least one LATENT=VALUE")
            specs, _, when = " ".join(args).partition(" when ")
            new = self.engine.parse_edits(specs.split(), when.strip() or None)
            latents = {e.latent for e in new}
            self.edits = [e for e in self.edits if e.latent not in latents] + new
            self._show_steering()
        elif name == "/unsteer":
            drop = {int(a) for a in args if a.isdigit()}
            if len(drop) != len(args):
                raise ValueError(f"/unsteer takes latent indices, got {rest!r}")
            self.edits = [e for e in self.edits if drop and e.latent not in drop]
            self._show_steering()
        else:
            raise ValueError(f"unknown command {name!r}; /help lists them")
        return True

    def _show_steering(self) -> None:
        text = "; ".join(describe_edit(e, self.engine.catalog) for e in self.edits) or "off"
        self.console.print(f"steering: {escape(text)}")


def run_chat(cfg: ChatConfig, console: Console | None = None, read: Callable[[str], str] | None = None) -> int:
    console = console or make_console()
    engine = Engine.load(cfg, cfg.sae, cfg.site, max_batch_size=1)
    session = ChatSession(engine, cfg, console, engine.parse_edits(cfg.steer, cfg.steer_when))
    interactive = console.is_terminal and sys.stdin.isatty()
    if read is None:
        read = (lambda prompt: console.input(prompt)) if interactive else (lambda prompt: input())
    if interactive:
        console.print(f"[bold]llama3-sae chat[/] · {escape(str(engine.ckpt_dir))}"
                      + (f" · SAE {escape(str(cfg.sae))} at {engine.site}" if cfg.sae else ""))
        if cfg.sae:
            console.print(f"labels: {escape(engine.catalog.provenance())}")
        console.print("type /help for commands")
        if session.edits:
            session._show_steering()
    while True:
        try:
            line = read("[bold cyan]you>[/] " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                console.print()
            return 0
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not session.command(line):
                    return 0
                continue
            session.reply(line)
        except ValueError as e:
            # A bad command or a conversation grown past the context: say so and keep the chat going.
            console.print(f"[red]error:[/] {escape(str(e))}")


def main_chat(argv: list[str] | None = None, prog: str = "llama3-sae chat") -> int:
    cfg = parse_config(ChatConfig, argv, prog, __doc__, usage_errors=True)
    return run_chat(cfg)
