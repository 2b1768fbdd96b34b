"""Dispatch capacity (lifecycle/dispatch.py): what is claimed given caps, in-flight work, queue room
and the batch size. Table tests; no database."""

from __future__ import annotations

import pytest

from certqueue.lifecycle.dispatch import claimable, queue_room

A, B, C = "https://a.example/dir", "https://b.example/dir", "https://c.example/dir"


@pytest.mark.parametrize(
    ("wanted", "in_flight", "cap", "room", "batch", "expected"),
    [
        # nothing waiting, nothing claimed
        ({}, {}, 200, 100, 500, {}),
        # under every limit: all of it
        ({A: 10}, {}, 200, None, 500, {A: 10}),
        # the per-CA cap: only the room under it
        ({A: 500}, {A: 150}, 200, None, 500, {A: 50}),
        ({A: 500}, {A: 200}, 200, None, 500, {}),
        ({A: 500}, {A: 260}, 200, None, 500, {}),  # over the cap (settings lowered): nothing, never negative
        # cap 0 means no cap
        ({A: 700}, {A: 10_000}, 0, None, 500, {A: 500}),
        # the batch bounds one dispatch
        ({A: 900}, {}, 0, None, 500, {A: 500}),
        # the queue's room bounds it too (waiting + reserved + unacknowledged messages)
        ({A: 100}, {}, 200, 30, 500, {A: 30}),
        ({A: 100}, {}, 200, 0, 500, {}),
        # a cap on one CA does not hold back another
        ({A: 100, B: 100}, {A: 200}, 200, None, 500, {B: 100}),
        # short room is shared round-robin: one CA's backlog cannot starve the other
        ({A: 1000, B: 1000}, {}, 0, 10, 500, {A: 5, B: 5}),
        ({A: 1000, B: 2}, {}, 0, 10, 500, {A: 8, B: 2}),
        ({A: 3, B: 3, C: 3}, {}, 0, 7, 500, {A: 3, B: 2, C: 2}),
        # negative counts from a racing query are treated as nothing
        ({A: -3}, {}, 200, None, 500, {}),
    ],
)
def test_claimable(
    wanted: dict[str, int],
    in_flight: dict[str, int],
    cap: int,
    room: int | None,
    batch: int,
    expected: dict[str, int],
) -> None:
    got = claimable(wanted, in_flight, cap=cap, room=room, batch=batch)
    assert got == expected
    assert sum(got.values()) <= batch and (room is None or sum(got.values()) <= room)


@pytest.mark.parametrize(
    ("max_depth", "depth", "expected"),
    [(2000, None, None), (2000, 0, 2000), (2000, 1999, 1), (2000, 2000, 0), (2000, 5000, 0)],
)
def test_queue_room(max_depth: int, depth: int | None, expected: int | None) -> None:
    assert queue_room(max_depth, depth) == expected


def test_a_cap_of_one_is_a_cap() -> None:
    """``cap`` 0 means no per-CA cap; 1 means one order in flight per CA."""
    assert claimable({"a": 5}, {}, cap=1, room=None, batch=100) == {"a": 1}
    assert claimable({"a": 5}, {"a": 1}, cap=1, room=None, batch=100) == {}


def test_a_ca_with_nothing_in_flight_gets_its_whole_cap() -> None:
    """A CA absent from ``in_flight`` has nothing running (not one)."""
    assert claimable({"a": 5, "b": 5}, {"b": 2}, cap=3, room=None, batch=100) == {"a": 3, "b": 1}
