"""Terminal output helpers (rich): consoles, progress bars, number formatting.

Tables go to stdout; progress and status lines go to stderr, so ``--json`` output and
shell pipes stay clean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["stdout_console", "stderr_console", "progress_callback", "format_count", "format_float"]

PROGRESS_MIN_ITEMS = 8


def stdout_console() -> Console:
    """Tables on stdout; wide enough to stay readable when piped to a file or CI log."""
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=False, width=160)
    return console


def stderr_console(quiet: bool = False) -> Console:
    return Console(stderr=True, highlight=False, quiet=quiet)


@contextlib.contextmanager
def progress_callback(
    console: Console, description: str, total: int, *, enabled: bool = True
) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(label)``; shows a bar on stderr when there are enough items."""
    if not enabled or total < PROGRESS_MIN_ITEMS:
        yield lambda _label: None
        return
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[label]}", style="dim"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, label="")

        def advance(label: str) -> None:
            progress.update(task, advance=1, label=label[-40:])

        yield advance


def format_count(value: int | float | None) -> str:
    """1234567 → '1.23M' (MACs, parameters)."""
    if value is None:
        return "?"
    value = float(value)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def format_float(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"
