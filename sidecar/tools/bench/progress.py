"""The progress line on stderr: one line, redrawn in place while a mode runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from sidecar.tools.bench.plan import ConnectionMode
from sidecar.tools.bench.summary import Tally


def progress_text(mode: ConnectionMode, elapsed: float, tallies: Sequence[Tally]) -> str:
    """The line itself, from the workers' counts so far."""
    done = sum(t.requests for t in tallies)
    return (f"{mode:<6} {elapsed:5.1f}s  {done} requests "
            f"({done / max(elapsed, 1e-9):.0f}/s)  "
            f"{sum(t.handshakes for t in tallies)} handshakes  "
            f"{sum(t.error_count for t in tallies)} errors")


class ProgressLine:
    """Draws over its own previous line with a carriage return."""

    def __init__(self, err: TextIO) -> None:
        self._err = err
        self._shown = 0  # the widest progress line drawn so far

    def show(self, line: str) -> None:
        self._err.write("\r" + line.ljust(self._shown))
        self._err.flush()
        self._shown = max(self._shown, len(line))

    def clear(self) -> None:
        if self._shown:  # blank the line (no escape codes: --progress may write to a log file)
            self._err.write("\r" + " " * self._shown + "\r")
            self._err.flush()
