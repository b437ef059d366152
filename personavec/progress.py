"""Progress on stderr, so stdout stays clean for answers and JSON.

On a terminal: a rich bar. Anywhere else (a file, a pipe, CI logs), where a bar would only be drawn once it is
finished: plain lines, one at the start, one at each further tenth of the work (at most every `PLAIN_EVERY_S`
seconds, except the last) and one at the end, each whole: `description: done/total (pct) elapsed, eta`.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr_console = Console(stderr=True)
PLAIN_EVERY_S = 5.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plain_progress_line(description: str, done: int, total: int, elapsed: float, info: str = "") -> str:
    """One line of plain progress; the eta extrapolates the rate so far."""
    eta = _clock(elapsed / done * (total - done)) if 0 < done < total else "-"
    line = f"{description}: {done}/{total} ({100 * done / total:.0f}%) elapsed {_clock(elapsed)}, eta {eta}"
    return f"{line} {info}".rstrip()


@contextmanager
def _plain_progress(description: str, total: int, stream=None, clock=time.monotonic):
    stream = stream or sys.stderr
    start = clock()
    state = {"done": 0, "tenth": 0, "printed_at": start, "info": ""}

    def emit() -> None:
        print(plain_progress_line(description, state["done"], total, clock() - start, state["info"]), file=stream,
              flush=True)
        state["printed_at"] = clock()

    emit()

    def advance(n: int = 1, info: str = "") -> None:
        state["done"] = min(total, state["done"] + n)
        state["info"] = info
        tenth = state["done"] * 10 // total
        if state["done"] < total and tenth > state["tenth"] and clock() - state["printed_at"] >= PLAIN_EVERY_S:
            state["tenth"] = tenth
            emit()

    try:
        yield advance
    finally:
        emit()  # also when interrupted: the log shows how far it got


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True):
    """Yield `advance(n, **fields)`; shows progress on stderr when enabled."""
    if not enabled or total == 0:
        yield lambda n=1, **fields: None
        return
    if not stderr_console.is_terminal:
        with _plain_progress(description, total) as advance:
            yield advance
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=stderr_console) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            progress.update(task, advance=n, info=info)

        yield advance
