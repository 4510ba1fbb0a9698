"""Progress of a long job: a bar (rows, rows/s, ETA) on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any


class Progress:
    """Counts rows done out of ``total`` (None: unknown) and shows it where the user looks."""

    def __init__(
        self,
        total: int | None,
        stream: IO[str] | None = None,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.done = 0
        self._every_s, self._clock = every_s, clock
        self._started = self._last = clock()
        self._bar: Any = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=" rows", unit_scale=True, file=self.stream, dynamic_ncols=True)

    def advance(self, rows: int) -> None:
        """``rows`` more are done."""
        self.done += rows
        if self._bar is not None:
            self._bar.update(rows)
        elif self._clock() - self._last >= self._every_s:
            self._last = self._clock()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """One plain progress line: rows done (of the total), rows/s and the time left when the total is known."""
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate else float("inf")
            return (
                f"scored {self.done:,} of {self.total:,} rows ({self.done / self.total:.0%}), {rate:,.0f} rows/s,"
                f" ETA {left:,.0f}s"
            )
        return f"scored {self.done:,} rows, {rate:,.0f} rows/s"

    def close(self) -> None:
        """Finish the bar (a terminal) or print the last line."""
        if self._bar is not None:
            self._bar.close()
        elif self.done:
            print(self.line(), file=self.stream, flush=True)
