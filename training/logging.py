"""What a training run reports: a Rich progress bar with a table of recent metrics, ``metrics.jsonl``,
optional Weights & Biases (offline by default, never required), and PNG plots of the curves at the end.

Only rank 0 writes. Each record of ``metrics.jsonl`` is one JSON object with ``split`` ("train" or
"val") and ``step``; a resumed run first drops the records written after its checkpoint, so no step is
reported twice.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from llama3_sae.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"

# The original project's W&B names, so old dashboards keep working; other metrics go under train/ and val/.
_WANDB_NAMES = {"mse": "loss", "aux_loss": "aux_loss", "loss": "total_loss"}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a missing file has none)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            # Only the last line can be cut short (a kill during a write); anything else is damage.
            if lineno == len(path.read_text().splitlines()):
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON; the metrics file is damaged") from None
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records up to ``step`` (a resumed run continues from there)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and, when enabled, to a W&B run."""

    def __init__(self, out: Path, *, resume_step: int | None, wandb: bool = False, wandb_project: str = "",
                 wandb_mode: str = "offline", config: dict[str, Any] | None = None):
        self.path = Path(out) / METRICS_FILE
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a")
        self._wandb = None
        if wandb:
            self._wandb = _start_wandb(Path(out), wandb_project, wandb_mode, config or {})

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            split = record.get("split", "train")
            data = {}
            for k, v in record.items():
                if k in ("split", "step") or not isinstance(v, (int, float)):
                    continue
                if k == "lr":
                    data["learning_rate"] = v
                elif k == "dead_fraction" and split == "train":
                    data["debug/dead_latents_ratio"] = v
                else:
                    data[f"{split}/{_WANDB_NAMES.get(k, k)}"] = v
            self._wandb.log(data, step=int(record["step"]))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(out: Path, project: str, mode: str, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ValueError("--wandb needs the wandb package: pip install wandb (or leave out --wandb; "
                         "metrics.jsonl has the same numbers)") from e
    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, mode=mode, dir=str(out), id=run_id, resume="allow", config=config)


# --------------------------------------------------------------------------- terminal display
_COLUMNS = [("step", "step", "{:d}"), ("epoch", "epoch", "{:.2f}"), ("mse", "loss", "{:.4g}"),
            ("aux_loss", "aux", "{:.3g}"), ("l0", "L0", "{:.1f}"), ("explained_variance", "EV", "{:.3f}"),
            ("dead_fraction", "dead", "{:.1%}"), ("lr", "lr", "{:.2e}"), ("k", "k", "{:d}"),
            ("tokens_per_s", "tok/s", "{:,.0f}"), ("eta_s", "ETA", None)]


def _fmt(key: str, fmt: str | None, value: Any) -> str:
    if value is None:
        return "-"
    if key == "eta_s":
        return format_seconds(value)
    try:
        return fmt.format(value) if fmt else str(value)
    except (ValueError, TypeError):
        return str(value)


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class TrainDisplay:
    """A progress bar with a table of the most recent metrics above it (plain lines when the console
    is not a terminal, nothing when disabled)."""

    def __init__(self, console: Console, total_steps: int, start_step: int, enabled: bool, rows: int = 8):
        self.console, self.enabled, self.max_rows = console, enabled, rows
        self.rows: list[dict[str, Any]] = []
        self.live_mode = enabled and console.is_terminal
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, auto_refresh=False)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step)
        self._live: Live | None = None
        self._last_refresh = 0.0

    def _render(self) -> Group:
        table = Table(*[title for _, title, _ in _COLUMNS], title="training metrics", title_justify="left",
                      expand=False, show_edge=False, pad_edge=False)
        for r in self.rows:
            table.add_row(*[_fmt(key, fmt, r.get(key)) for key, _, fmt in _COLUMNS])
        return Group(table, self.progress) if self.rows else Group(self.progress)

    def __enter__(self) -> TrainDisplay:
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.__exit__(*exc)
            self._live = None

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)
        now = time.monotonic()
        if self._live is not None and now - self._last_refresh > 0.25:
            self._live.update(self._render(), refresh=True)
            self._last_refresh = now

    def add(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows = (self.rows + [record])[-self.max_rows:]
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
        else:
            parts = [f"{title} {_fmt(key, fmt, record.get(key))}" for key, title, fmt in _COLUMNS
                     if record.get(key) is not None]
            self.console.print("  ".join(parts), highlight=False)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)


# --------------------------------------------------------------------------- plots
_PANELS = [("mse", "reconstruction loss (normalised MSE)", True), ("aux_loss", "aux-k loss", True),
           ("l0", "L0 (active latents per token)", False), ("explained_variance", "explained variance", False),
           ("dead_fraction", "dead fraction (val: no firing on held-out rows)", False),
           ("lr", "learning rate", False)]


def plot_training_curves(records: Iterable[dict[str, Any]], path: Path) -> Path:
    """A 2 x 3 grid of training (and validation) curves against tokens seen, written as a PNG.
    Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    records = list(records)
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title, log_y) in zip(axes, _PANELS):
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(r["tokens"], r[key]) for r in records
                   if r.get("split") == split and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        if log_y and any(line.get_ydata().size and min(line.get_ydata()) > 0 for line in ax.get_lines()):
            ax.set_yscale("log")
        if ax.get_lines():
            ax.legend()
        ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
