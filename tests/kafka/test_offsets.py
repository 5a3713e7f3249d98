"""Unit tests of the offset tracker: only the contiguous settled prefix is
ever committable, whatever order acks come in."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from transport_kafka import OffsetTracker


def test_commit_stops_at_the_lowest_unsettled_offset() -> None:
    tracker = OffsetTracker()
    gen = tracker.assign(0, committed=10)
    for offset in range(10, 15):
        assert tracker.track(0, offset, gen)
    assert tracker.commit_candidates() == {}  # nothing settled: 10 is already committed
    for offset in (14, 12, 11):
        assert tracker.settle(0, offset, gen)
    assert tracker.commit_candidates() == {}  # 10 is still outstanding
    assert tracker.settle(0, 10, gen)
    assert tracker.commit_candidates() == {0: 13}  # 13 is outstanding
    tracker.committed(0, 13)
    assert tracker.settle(0, 13, gen)
    assert tracker.commit_candidates() == {0: 15}


def test_double_settle_and_unknown_offsets_are_refused() -> None:
    tracker = OffsetTracker()
    gen = tracker.assign(3, committed=None)
    tracker.track(3, 0, gen)
    assert tracker.settle(3, 0, gen)
    assert not tracker.settle(3, 0, gen)
    assert not tracker.settle(3, 7, gen)
    assert tracker.commit_candidates() == {3: 1}


def test_gaps_in_offsets_do_not_block_commits() -> None:
    # Compaction or transaction markers leave holes: only seen offsets count.
    tracker = OffsetTracker()
    gen = tracker.assign(0, committed=None)
    for offset in (0, 2, 5):
        tracker.track(0, offset, gen)
    tracker.settle(0, 0, gen)
    tracker.settle(0, 5, gen)
    assert tracker.commit_candidates() == {0: 2}
    tracker.settle(0, 2, gen)
    assert tracker.commit_candidates() == {0: 6}


def test_records_settled_before_a_crash_do_not_hold_the_prefix() -> None:
    tracker = OffsetTracker()
    gen = tracker.assign(0, committed=4)
    tracker.track(0, 4, gen)
    tracker.track(0, 5, gen, settled=True)  # acked before the crash (state marker)
    tracker.track(0, 6, gen)
    assert tracker.outstanding() == 2
    tracker.settle(0, 4, gen)
    assert tracker.commit_candidates() == {0: 6}


def test_revocation_returns_the_safe_position_and_refuses_old_acks() -> None:
    tracker = OffsetTracker()
    gen = tracker.assign(1, committed=0)
    for offset in range(4):
        tracker.track(1, offset, gen)
    tracker.settle(1, 0, gen)
    tracker.settle(1, 2, gen)
    assert tracker.revoke(1) == 1
    # Acks from the old assignment become redeliveries, never commits.
    assert not tracker.settle(1, 1, gen)
    assert not tracker.current(1, gen)
    assert tracker.commit_candidates() == {}
    new_gen = tracker.assign(1, committed=1)
    assert new_gen != gen
    assert not tracker.settle(1, 1, gen)
    assert not tracker.track(1, 1, gen)
    assert tracker.track(1, 1, new_gen)


def test_refetched_offsets_below_the_commit_are_ignored() -> None:
    tracker = OffsetTracker()
    gen = tracker.assign(0, committed=8)
    assert not tracker.track(0, 7, gen)
    assert tracker.outstanding() == 0


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    g0, g1 = tracker.assign(0, committed=None), tracker.assign(1, committed=None)
    tracker.track(0, 0, g0)
    tracker.track(1, 0, g1)
    tracker.track(1, 1, g1)
    tracker.settle(1, 1, g1)
    tracker.settle(0, 0, g0)
    # Partition 1 may commit its start (nothing before offset 0 is pending),
    # never offset 1 while 0 is outstanding.
    assert tracker.commit_candidates() == {0: 1, 1: 0}
    assert not tracker.settle(0, 0, g1), "a generation belongs to one partition"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=60), st.randoms(use_true_random=False))
def test_any_ack_order_never_commits_past_an_unsettled_offset(n: int, rnd: random.Random) -> None:
    tracker = OffsetTracker()
    gen = tracker.assign(0, committed=None)
    for offset in range(n):
        tracker.track(0, offset, gen)
    order = list(range(n))
    rnd.shuffle(order)
    settled: set[int] = set()
    last_commit: int | None = None
    for offset in order:
        assert tracker.settle(0, offset, gen)
        settled.add(offset)
        candidate = tracker.commit_candidates().get(0)
        if candidate is not None:
            assert last_commit is None or candidate > last_commit
            assert all(o in settled for o in range(candidate)), "committed past an unsettled record"
            unsettled = [o for o in range(n) if o not in settled]
            assert candidate == (min(unsettled) if unsettled else n)
            tracker.committed(0, candidate)
            last_commit = candidate
    assert last_commit == n


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 9), st.booleans()), max_size=30))
def test_batch_settle_and_covered_answer_as_one_call_each(
    calls: list[tuple[int, int, bool]],
) -> None:
    """``settle_many`` and ``covered_many`` (a batch ack) give, in order, what
    ``settle`` and ``covered`` give one by one: duplicates in a batch, stale
    generations and unknown offsets included."""
    one, many = OffsetTracker(), OffsetTracker()
    gens: dict[int, tuple[int, int]] = {}
    for p in (0, 1):  # partition 2 is never assigned
        gens[p] = (one.assign(p, committed=3), many.assign(p, committed=3))
        for off in range(3, 8):
            one.track(p, off, gens[p][0])
            many.track(p, off, gens[p][1])
    stale = 0  # a generation neither tracker has
    batch_one = [(p, o, gens[p][0] if p in gens and fresh else stale) for p, o, fresh in calls]
    batch_many = [(p, o, gens[p][1] if p in gens and fresh else stale) for p, o, fresh in calls]
    expected = [one.settle(*c) for c in batch_one]
    assert many.settle_many(batch_many) == expected
    assert one.commit_candidates() == many.commit_candidates()
    for p, position in one.commit_candidates().items():
        one.committed(p, position)
        many.committed(p, position)
    assert many.covered_many(batch_many) == [one.covered(*c) for c in batch_one]
