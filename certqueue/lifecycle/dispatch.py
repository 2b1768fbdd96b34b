"""Dispatch capacity: how much new work may start now. Pure: no ORM, no queue.

Dispatch (beat's heartbeat, and a top-up after every finished batch) claims pending intents and
due renewals only up to what may run now; the rest stays in the database with no message and no
spinning retry. The inputs are gathered by ``certqueue.dispatch``; this module only decides.

* per CA: ``cap - in_flight`` certificates may start an order (``cap`` 0 means no cap);
* all CAs together: no more than the room left in the acme queue (``max_depth`` less the messages
  waiting, reserved by workers or unacknowledged);
* one dispatch claims at most ``batch`` certificates.

When the room is short, CAs share it round-robin in name order, so one CA's backlog cannot starve
another's.
"""

from __future__ import annotations

from collections.abc import Mapping


def queue_room(max_depth: int, depth: int | None) -> int | None:
    """Messages the acme queue may still take; None when the depth is unknown (no limit known)."""
    if depth is None:
        return None
    return max(0, max_depth - depth)


def claimable(
    wanted: Mapping[str, int],
    in_flight: Mapping[str, int],
    *,
    cap: int,
    room: int | None,
    batch: int,
) -> dict[str, int]:
    """How many certificates to claim per CA, given what is waiting (``wanted``), what is already
    running (``in_flight``), the per-CA ``cap``, the queue ``room`` and the ``batch`` size."""
    per_ca: dict[str, int] = {}
    for ca in sorted(wanted):
        n = max(0, wanted[ca])
        if cap > 0:
            n = min(n, max(0, cap - in_flight.get(ca, 0)))
        if n:
            per_ca[ca] = n
    total = max(0, batch if room is None else min(batch, room))
    if sum(per_ca.values()) <= total:
        return per_ca
    granted = {ca: 0 for ca in per_ca}
    left = total
    while left > 0:
        progressed = False
        for ca in per_ca:
            if left == 0:
                break
            if granted[ca] < per_ca[ca]:
                granted[ca] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return {ca: n for ca, n in granted.items() if n}
