"""Progress of a long job (`score`, `features load`, `produce`): a bar (count, rate, ETA) on a terminal (tqdm), a
plain line every few seconds otherwise, so a log file or a CI run gets lines instead of carriage returns."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any


class Progress:
    """Counts units done out of ``total`` (None: unknown) and shows it where the user looks: "scored 500 of
    1,000 rows" (``verb``, ``unit``)."""

    def __init__(
        self,
        total: int | None,
        stream: IO[str] | None = None,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        verb: str = "scored",
        unit: str = "rows",
    ) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.done = 0
        self.verb, self.unit = verb, unit
        self._every_s, self._clock = every_s, clock
        self._started = self._last = clock()
        self._bar: Any = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit=f" {unit}", unit_scale=True, file=self.stream, dynamic_ncols=True, desc=verb
            )

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
                f"{self.verb} {self.done:,} of {self.total:,} {self.unit} ({self.done / self.total:.0%}),"
                f" {rate:,.0f} {self.unit}/s, ETA {left:,.0f}s"
            )
        return f"{self.verb} {self.done:,} {self.unit}, {rate:,.0f} {self.unit}/s"

    def close(self) -> None:
        """Finish the bar (a terminal) or print the last line."""
        if self._bar is not None:
            self._bar.close()
        elif self.done:
            print(self.line(), file=self.stream, flush=True)
