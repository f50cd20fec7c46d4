"""Rich rendering of a streaming batch for ``llama3-sae complete`` and ``llama3-sae chat``.

On a terminal: one live view with every prompt's text growing as it is generated and, with an SAE, a
panel of the top active latents (with labels) at the token each prompt just processed. Anywhere else
(a pipe, a file): plain text, streamed as it comes for a single prompt, one line per prompt at the end
for several, so the output can be read by other programs.
"""

from __future__ import annotations

import sys
import time
from typing import Iterator, Sequence

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sae import Edit

from .engine import EngineStep
from .latents import UNLABELLED, LatentCatalog


def describe_edit(edit: Edit, catalog: LatentCatalog | None = None) -> str:
    what = {"add": f"{edit.value:+g}", "set": f"= {edit.value:g}", "zero": "= 0",
            "clamp": f"clamped to [{'' if edit.min is None else f'{edit.min:g}'}, "
                     f"{'' if edit.max is None else f'{edit.max:g}'}]"}[edit.op]
    label = ""
    if catalog is not None and edit.latent < catalog.n_latents and catalog.label(edit.latent) != UNLABELLED:
        label = f" ({catalog.label(edit.latent)})"
    when = f" where {edit.when}" if edit.when is not None else ""
    return f"latent {edit.latent} {what}{label}{when}"


class StreamView:
    """Consumes an ``Engine.stream`` and shows it. ``headers[i]`` is printed before row i's text (the
    prompt for completions, "assistant" for chat). Returns the texts from ``run``."""

    def __init__(self, console: Console, headers: Sequence[str], *, catalog: LatentCatalog | None = None,
                 edits: Sequence[Edit] = (), show_latents: bool = True, fps: float = 12.0,
                 title: str = "completions", chat: bool = False):
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.console = console
        self.headers = list(headers)
        self.catalog = catalog
        self.steered = {e.latent for e in edits}
        self.edits = list(edits)
        self.show_latents = show_latents and catalog is not None and catalog.n_latents > 0
        self.min_interval = 1.0 / fps
        self.title = title
        self.chat = chat
        n = len(self.headers)
        self.texts = [""] * n
        self.done = [False] * n
        self.tokens: list[str | None] = [None] * n
        self.latents: list[list[tuple[int, float]]] = [[] for _ in range(n)]

    # ------------------------------------------------------------------ state
    def _absorb(self, step: EngineStep) -> None:
        for i, d in enumerate(step.deltas):
            self.texts[i] += d
        self.done = list(step.done)
        if step.latents is not None:
            for i, lat in enumerate(step.latents):
                if step.token[i] is not None:  # keep the last reading of a finished row
                    self.tokens[i] = step.token[i]
                    self.latents[i] = lat

    def run(self, steps: Iterator[EngineStep]) -> list[str]:
        if self.console.is_terminal:
            self._run_live(steps)
        else:
            self._run_plain(steps)
        return self.texts

    # ------------------------------------------------------------------ plain
    def _run_plain(self, steps: Iterator[EngineStep]) -> None:
        out = sys.stdout  # looked up now: tests and callers may have replaced it
        single = len(self.headers) == 1
        if single:
            out.write(f"{self.headers[0]}: " if self.chat else self.headers[0])
            out.flush()
        for step in steps:
            before = self.texts[0]
            self._absorb(step)
            if single and self.texts[0] != before:
                out.write(self.texts[0][len(before):])
                out.flush()
        if single:
            out.write("\n")
        else:
            for i, h in enumerate(self.headers):
                out.write(f"[{i + 1}] {h}{self.texts[i]}\n")
        out.flush()

    # ------------------------------------------------------------------ live
    def _run_live(self, steps: Iterator[EngineStep]) -> None:
        # Refreshed by hand, at most `fps` times a second: a fast model then costs no extra rendering, and
        # a slow one shows every token as it comes.
        with Live(self.render(), console=self.console, auto_refresh=False, vertical_overflow="visible") as live:
            last = 0.0
            for step in steps:
                self._absorb(step)
                now = time.monotonic()
                if now - last >= self.min_interval or all(self.done):
                    live.update(self.render(), refresh=True)
                    last = now
            live.update(self.render(final=True), refresh=True)

    def render(self, final: bool = False) -> Group:
        body = Text()
        for i, h in enumerate(self.headers):
            if i:
                body.append("\n\n")
            if self.chat:
                body.append(f"{h}: ", style="bold green")
            else:
                if len(self.headers) > 1:
                    body.append(f"[{i + 1}] ", style="dim")
                body.append(h, style="bold")
            body.append(self.texts[i])
            if not self.done[i] and not final:
                body.append("▌", style="blink")
        parts: list = [Panel(body, title=Text(self.title), border_style="cyan")]
        if self.show_latents:
            parts.append(self._latent_panel())
        return Group(*parts)

    def _latent_panel(self) -> Panel:
        assert self.catalog is not None
        table = Table(expand=True, show_edge=False, pad_edge=False)
        if len(self.headers) > 1:
            table.add_column("#", style="dim", no_wrap=True)
        table.add_column("token", no_wrap=True)
        table.add_column("latent", justify="right", no_wrap=True)
        table.add_column("act", justify="right", no_wrap=True)
        table.add_column("label", ratio=1)
        for i in range(len(self.headers)):
            for j, (latent, value) in enumerate(self.latents[i]):
                steered = latent in self.steered
                # Text, not str: labels and tokens are data, never Rich markup.
                row = [Text(repr(self.tokens[i]) if j == 0 and self.tokens[i] is not None else ""),
                       Text(str(latent)), Text(f"{value:.2f}"),
                       Text(self.catalog.label(latent) + ("  ◆ steered" if steered else ""))]
                if len(self.headers) > 1:
                    row.insert(0, Text(str(i) if j == 0 else ""))
                table.add_row(*row, style="magenta" if steered else None)
        subtitle = None
        if self.edits:
            subtitle = Text("steering: " + "; ".join(describe_edit(e, self.catalog) for e in self.edits))
        return Panel(table, title="top latents · latest token", subtitle=subtitle, border_style="magenta",
                     subtitle_align="left")


def make_console(stderr: bool = False) -> Console:
    """A console that wraps nothing in plain mode (pipes get the text exactly as generated)."""
    return Console(stderr=stderr, highlight=False, soft_wrap=False)
