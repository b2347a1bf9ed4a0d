"""What every command shares: user errors as one line, and progress rendered as a bar."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBar
from typer.core import TyperGroup

from moequant.errors import MoequantError
from moequant.progress import Progress

console = Console(stderr=True)
out = Console()


class UserErrors(TyperGroup):
    """The command group: a :class:`MoequantError` or an ``OSError`` from any command is one line and exit 1.

    ``MOEQUANT_DEBUG=1`` shows the traceback instead; Ctrl-C exits 130.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (MoequantError, OSError) as exc:
            if os.environ.get("MOEQUANT_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("interrupted (an interrupted compress continues with --resume)", highlight=False)
            sys.exit(130)


def _one_line(exc: Exception) -> str:
    """The message of a user error, or ``<path>: <reason>`` for an operating-system error; under torchrun
    it names the rank."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        text = f"{exc.filename}: {reason}" if exc.filename else reason
    else:
        text = str(exc)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        text = f"rank {os.environ.get('RANK', '?')}: {text}"
    return text


def print_readers(info: dict) -> None:
    """Which readers take a checkpoint's format and layout, and which do not."""
    if info.get("format"):
        out.print(f"stored as {info['format']}, {info['layout']} layout; read by {', '.join(info['readers'])}",
                  highlight=False)
    for reader in info.get("not_read_by") or []:
        out.print(f"[yellow]not read by:[/] {escape(reader)}", highlight=False)


def print_engine_limits(notes: list[str]) -> None:
    """The limits of other GPTQ engines a checkpoint runs into, one line each."""
    for note in notes:
        out.print(f"[yellow]other engines:[/] {escape(note)}", highlight=False)


class RichProgress(Progress):
    """Renders library progress events as a rich bar with the stage and ETA."""

    def __init__(self) -> None:
        self._bar: RichBar | None = None
        self._task = None

    def begin(self, total: int, title: str) -> None:
        self._bar = RichBar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stage]}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=console, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(title, total=total, stage="")

    def stage(self, step: int, name: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, stage=f"layer {step}: {name}")

    def advance(self, step: int, info: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, stage="")

    def note(self, text: str) -> None:
        console.print(text, highlight=False)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
