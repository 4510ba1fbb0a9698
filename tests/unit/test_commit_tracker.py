"""CommitTracker: which at-least-once offsets are still to be committed, without a broker."""

from __future__ import annotations

from streamserve.pipeline.source import CommitTracker

P0 = ("in", 0)
P1 = ("in", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracker(*partitions: tuple[str, int], first_read: int = 0) -> tuple[CommitTracker, Clock]:
    clock = Clock()
    offsets = CommitTracker(interval_s=1.0, clock=clock)
    offsets.assign(partitions)
    for tp in partitions:
        offsets.read(tp, first_read)
    return offsets, clock


def test_released_offsets_are_due_at_once_then_not_again_within_the_interval() -> None:
    offsets, clock = tracker(P0, P1)
    offsets.release([(P0, 10), (P1, 5)])
    assert offsets.due() == {P0: 10, P1: 5}
    clock.now += 0.5
    assert offsets.due() == {}


def test_a_failed_commit_is_sent_again_every_interval_until_confirmed() -> None:
    offsets, clock = tracker(P0)
    offsets.release([(P0, 10)])
    assert offsets.due() == {P0: 10}  # this commit fails: no confirmation arrives
    clock.now += 0.99
    assert offsets.due() == {}
    clock.now += 0.01
    assert offsets.due() == {P0: 10}
    offsets.confirmed([(P0, 10)])
    clock.now += 5
    assert offsets.due() == {}
    assert offsets.pending() == {}


def test_new_releases_carry_the_unconfirmed_offsets_of_other_partitions() -> None:
    offsets, _ = tracker(P0, P1)
    offsets.release([(P0, 10)])
    assert offsets.due() == {P0: 10}
    offsets.release([(P1, 7)])
    assert offsets.due() == {P0: 10, P1: 7}


def test_the_highest_offset_wins_and_an_older_confirmation_leaves_it_pending() -> None:
    offsets, _ = tracker(P0)
    offsets.release([(P0, 20), (P0, 12)])
    offsets.release([(P0, 15)])
    assert offsets.pending() == {P0: 20}
    offsets.confirmed([(P0, 12)])
    assert offsets.pending() == {P0: 20}
    offsets.confirmed([(P0, 20)])
    assert offsets.pending() == {}


def test_partitions_not_owned_are_never_tracked() -> None:
    offsets, _ = tracker(P0)
    offsets.read(P1, 0)
    offsets.release([(P1, 10)])
    offsets.release_positions([(P1, 10)])
    assert offsets.due() == {}


def test_revoked_or_lost_partitions_are_forgotten() -> None:
    offsets, clock = tracker(P0, P1)
    offsets.release([(P0, 10), (P1, 10)])
    offsets.forget([P1])
    assert offsets.pending() == {P0: 10}
    offsets.release([(P1, 20)])  # a late acknowledgement of the revoked partition
    offsets.confirmed([(P1, 20)])
    clock.now += 2
    assert offsets.due() == {P0: 10}


def test_acknowledgements_from_a_previous_ownership_cannot_move_the_group_back() -> None:
    offsets, _ = tracker(P0, first_read=0)
    offsets.release([(P0, 50)])
    offsets.forget([P0])
    offsets.assign([P0])  # owned again; another member committed up to 80 meanwhile
    offsets.release([(P0, 60)])  # a batch of the first ownership acknowledged late
    assert offsets.pending() == {}
    offsets.read(P0, 80)
    offsets.release([(P0, 70), (P0, 80)])
    assert offsets.pending() == {}
    offsets.release([(P0, 81)])
    assert offsets.pending() == {P0: 81}


def test_idle_positions_are_committed_even_before_a_record_was_read() -> None:
    offsets, _ = tracker(P0)
    offsets.assign([P1])
    offsets.release_positions([(P0, 12), (P1, 30)])
    assert offsets.due() == {P0: 12, P1: 30}


def test_idle_positions_never_lower_a_wanted_offset_and_invalid_ones_are_ignored() -> None:
    offsets, _ = tracker(P0, P1)
    offsets.release([(P0, 40)])
    offsets.release_positions([(P0, 30), (P1, -1001)])
    assert offsets.pending() == {P0: 40}


def test_only_the_first_record_read_since_the_assignment_sets_the_floor() -> None:
    offsets, _ = tracker(P0, first_read=5)
    assert offsets.unread == set()
    offsets.read(P0, 100)  # later records do not move it
    offsets.release([(P0, 6)])
    assert offsets.pending() == {P0: 6}
