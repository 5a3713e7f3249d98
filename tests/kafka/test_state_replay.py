"""Folding the state topic into per-record markers (no broker)."""

from __future__ import annotations

import json

from transport_kafka._client import RawRecord
from transport_kafka._records import _replay_markers


def _rec(key: str, value: object | None) -> RawRecord:
    data = None if value is None else json.dumps(value).encode()
    return RawRecord("ns.q.state", 0, 0, key.encode(), data, {})


def test_rounds_and_single_markers_merge_by_maximum_and_settled_sticks() -> None:
    replay = [
        _rec("0:r5-7.ab1", {"ds": [[5, 1], [6, 1], [7, 1]]}),
        _rec("0:6", {"s": 1}),  # acked out of order
        _rec("0:r5-5.ab2", {"ds": [[5, 2]]}),  # delivered again
        _rec("0:7", {"d": 1}),  # an older single count does not lower it
        _rec("0:r3-4.ab3", {"ds": [[3, 1], [4, 1]]}),  # below the committed offset
        _rec("1:r0-1.ab4", {"ds": [[0, 1], [1, 1]]}),  # a partition not assigned
        _rec("0:r8-9.ab5", {"ds": [[8, 1], [9, 1]]}),
        _rec("0:r8-9.ab5", None),  # tombstoned round
        _rec("junk", {"d": 1}),
        _rec("0:r10-10.ab6", {"unexpected": True}),
    ]
    markers, single, rounds = _replay_markers(replay, {0}, {0: 5})
    assert markers[(0, 5)] == {"d": 2}
    assert markers[(0, 6)] == {"d": 1, "s": 1}
    assert markers[(0, 7)] == {"d": 1}
    assert (0, 3) not in markers and (0, 4) not in markers
    assert all(p == 0 for p, _ in markers)
    assert single == {(0, 6), (0, 7)}
    # Round keys are remembered with their highest offset (to tombstone them
    # once the committed offset passes it), except the tombstoned one.
    assert rounds == {0: {b"0:r5-7.ab1": 7, b"0:r5-5.ab2": 5, b"0:r3-4.ab3": 4}}


def test_a_single_tombstone_clears_its_marker() -> None:
    replay = [_rec("0:5", {"d": 1}), _rec("0:5", None)]
    markers, single, _ = _replay_markers(replay, {0}, {})
    assert markers == {} and single == set()


def test_a_rewritten_key_withdraws_counts_and_other_keys_keep_theirs() -> None:
    replay = [
        _rec("0:r5-6.ab1", {"ds": [[5, 1], [6, 1]]}),  # 5 handed out, 6 only reserved
        _rec("0:7", {"d": 2}),  # reserved for its second delivery
        _rec("0:r6-8.ab2", {"ds": [[6, 1], [8, 1]]}),
        # A clean close withdraws what it reserved but did not hand out:
        _rec("0:r5-6.ab1", {"ds": [[5, 1], [6, 0]]}),
        _rec("0:7", {"d": 1}),
        _rec("0:r6-8.ab2", {"ds": [[6, 0], [8, 0]]}),
    ]
    markers, single, rounds = _replay_markers(replay, {0}, {})
    assert markers == {(0, 5): {"d": 1}, (0, 6): {"d": 0}, (0, 7): {"d": 1}, (0, 8): {"d": 0}}
    assert single == {(0, 7)}
    assert rounds == {0: {b"0:r5-6.ab1": 6, b"0:r6-8.ab2": 8}}
