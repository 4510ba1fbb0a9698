"""The micro-batcher's size and time bounds, on an injected clock (no sleeping)."""

from __future__ import annotations

import pytest

from streamserve.pipeline.batch import MicroBatcher


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_size_bound_closes_batch_and_keeps_the_rest_in_order() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=4, max_wait_ms=1000, clock=ManualClock())
    batcher.add(range(3))
    assert not batcher.ready()
    assert batcher.room == 1
    batcher.add(range(3, 10))
    assert batcher.ready()
    assert batcher.take() == [0, 1, 2, 3]
    assert batcher.take() == [4, 5, 6, 7]
    assert len(batcher) == 2
    assert batcher.take() == [8, 9]
    assert not batcher.ready()


def test_time_bound_counts_from_the_first_item() -> None:
    clock = ManualClock()
    batcher: MicroBatcher[str] = MicroBatcher(max_batch_size=100, max_wait_ms=50, clock=clock)
    assert batcher.time_left() == pytest.approx(0.05)
    batcher.add(["a"])
    clock.now += 0.030
    batcher.add(["b"])
    assert not batcher.ready()
    assert batcher.time_left() == pytest.approx(0.020)
    clock.now += 0.020
    assert batcher.ready()
    assert batcher.take() == ["a", "b"]
    assert batcher.time_left() == pytest.approx(0.05)


def test_mark_open_starts_the_clock_before_items_arrive() -> None:
    clock = ManualClock()
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=10, max_wait_ms=10, clock=clock)
    batcher.mark_open()
    clock.now += 0.010
    batcher.add([1])
    assert batcher.ready(), "an item that arrived after waiting max_wait_ms is due at once"


def test_empty_batcher_is_never_ready_and_drop_removes_items() -> None:
    clock = ManualClock()
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=10, max_wait_ms=0, clock=clock)
    assert not batcher.ready()
    batcher.add([1, 2, 3, 4])
    assert batcher.drop(lambda item: item % 2 == 0) == [1, 3]
    assert batcher.take() == [2, 4]


def test_rejects_zero_batch_size() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(max_batch_size=0, max_wait_ms=10)


def test_age_counts_from_when_the_loop_began_waiting() -> None:
    now = [100.0]
    batcher = MicroBatcher[int](10, 50, clock=lambda: now[0])
    assert batcher.age() == 0.0
    batcher.mark_open()  # the loop starts waiting; a record arrives 30 ms later
    now[0] += 0.030
    batcher.add([1])
    assert batcher.age() == pytest.approx(0.030)
    now[0] += 0.020
    assert batcher.ready(), "its first record has waited max_wait_ms"
    assert batcher.age() == pytest.approx(0.050)
    batcher.take()
    assert batcher.age() == 0.0
