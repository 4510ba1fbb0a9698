"""What a feature lookup asks Redis and what comes back: one request and one Replies per key group.

A hash group's reply is one flat list of keys x fields values (row-major, the update stamp last when the group
has one); a packed group's reply is one bytes (or None) per key. A lookup may be sent ahead of the batch that
needs it: :class:`PendingReplies` is that lookup under way, whoever fetches it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

FeatureRequest = tuple[list[str] | None, list[str]]
"""(hash fields, distinct keys) of one key group; fields None asks for the keys' packed vectors (MGET)."""


@dataclass(slots=True)
class Replies:
    """One key group's reply, in the order of the keys asked: for hashes one flat list of keys x fields values
    (row-major, None where absent), for packed vectors one bytes (or None) per key. ``errors``: the keys whose
    read failed (WRONGTYPE...), by position; their values are ignored."""

    values: list[Any]
    errors: dict[int, Exception] = field(default_factory=dict)

    @classmethod
    def failed(cls, error: Exception, keys: int, width: int) -> Replies:
        """Every key of the group carries the error."""
        return cls([None] * (keys * width), dict.fromkeys(range(keys), error))

    def stamps(self, width: int, samples: int) -> list[float]:
        """The update stamps (the last of the ``width`` fields asked of each key) of at most about ``samples``
        evenly spaced keys; absent and unreadable stamps and those of keys whose read failed are skipped."""
        per_key = self.values[width - 1 :: width]
        found = []
        for key in range(0, len(per_key), max(1, len(per_key) // samples)):
            if per_key[key] is None or key in self.errors:
                continue
            try:
                found.append(float(per_key[key]))
            except (TypeError, ValueError):
                continue
        return found


FetchFeatures = Callable[[Sequence[FeatureRequest]], list[Replies]]
"""Given one request per key group, one Replies per group (the whole round trip, with retries and policies)."""


def _nothing() -> None:
    """Nothing held: nothing to free."""


@dataclass(eq=False, slots=True)
class PendingReplies:
    """A feature lookup under way: its requests and how its replies are read.

    Sent ahead (``sent``), the commands went out on a connection of their own and ``read`` takes their replies
    from it (or fetches again on any error); not sent, ``read`` makes the whole call. Either way ``result()``
    gives what the fetcher's call would have returned, its errors and policies included.
    """

    requests: Sequence[FeatureRequest]
    read: Callable[[], list[Replies]]
    drop: Callable[[], None] = _nothing
    """Frees what the lookup holds when its replies will not be read (the batch changed)."""
    sent: bool = False

    @classmethod
    def deferred(cls, fetch: FetchFeatures, requests: Sequence[FeatureRequest]) -> PendingReplies:
        """A lookup with no head start: result() makes the call (fetchers that cannot send ahead)."""
        return cls(requests, lambda: fetch(requests))

    def result(self) -> list[Replies]:
        """The replies, one per request."""
        return self.read()

    def cancel(self) -> None:
        """The replies will not be read: free what the lookup holds."""
        self.drop()


StartFetch = Callable[[Sequence[FeatureRequest]], PendingReplies]
"""Sends one request per key group now; the PendingReplies' result() waits for them."""
