"""The micro-batcher: a batch closes when it holds max_batch_size records or max_wait_ms has passed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Collects items into batches bounded by size and by the age of their oldest item.

    The clock is injectable (seconds, monotonic) so the time bound is testable without sleeping.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_wait_ms: float,
        clock: Callable[[], float] = time.monotonic,
        ahead: int = 0,
    ) -> None:
        """``ahead``: whole batches held beyond the open one (room counts them), so the next batch's work can
        start before the open one is processed (see peek)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.ahead = ahead
        self.max_wait_s = max_wait_ms / 1000
        self._clock = clock
        self._items: list[T] = []
        self._opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: Iterable[T]) -> None:
        """Append items; the batch's clock starts with its first item."""
        before = len(self._items)
        self._items.extend(items)
        if before == 0 and self._items and self._opened_at is None:
            self._opened_at = self._clock()

    def mark_open(self) -> None:
        """Start the time bound now, before any item arrives (when the caller begins to wait)."""
        if not self._items:
            self._opened_at = self._clock()

    @property
    def room(self) -> int:
        """How many more items to take in: what the open batch lacks, and once it is full, the batches held
        ahead (so a poll waiting for the open batch never waits for more than it)."""
        held = len(self._items)
        if held < self.max_batch_size:
            return self.max_batch_size - held
        return max(0, (1 + self.ahead) * self.max_batch_size - held)

    def time_left(self) -> float:
        """Seconds until the time bound closes the open batch (max_wait when nothing is open)."""
        if self._opened_at is None:
            return self.max_wait_s
        return max(0.0, self._opened_at + self.max_wait_s - self._clock())

    def age(self) -> float:
        """Seconds since the open batch's clock started (0 when nothing is open)."""
        return 0.0 if self._opened_at is None else self._clock() - self._opened_at

    def ready(self) -> bool:
        """True when the open batch must be processed now."""
        if not self._items:
            return False
        return len(self._items) >= self.max_batch_size or self.time_left() <= 0.0

    def take(self) -> list[T]:
        """Close the batch: up to max_batch_size items, oldest first; the rest open the next batch."""
        batch, self._items = self._items[: self.max_batch_size], self._items[self.max_batch_size :]
        self._opened_at = self._clock() if self._items else None
        return batch

    def peek(self) -> list[T] | None:
        """What take() will return next when it is already decided (a full batch is held), else None."""
        if len(self._items) < self.max_batch_size:
            return None
        return self._items[: self.max_batch_size]

    def drop(self, keep: Callable[[T], bool]) -> list[T]:
        """Remove the items that fail ``keep`` (e.g. of revoked partitions) and return them."""
        dropped = [item for item in self._items if not keep(item)]
        self._items = [item for item in self._items if keep(item)]
        if not self._items:
            self._opened_at = None
        return dropped
