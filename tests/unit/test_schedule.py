"""Beat's schedule (certqueue.schedule): the reconciler runs often enough to resume parked work
near its park delay, and lost work near ``stuck_after_seconds``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from certqueue.config import Settings
from certqueue.schedule import beat_schedule


@pytest.mark.parametrize(
    ("stuck_after", "park_initial", "every"),
    [
        (900, 60, 30),  # shipped: parked work resumes within half a minute of its delay
        (12, 60, 4),  # lost work found within a third of stuck_after
        (900, 6, 3),
        (3600, 3600, 300),  # never less often than every five minutes
        (1, 1, 1),  # never more often than every second
    ],
)
def test_the_reconciler_runs_often_enough_for_parked_and_lost_work(
    settings_factory: Callable[..., Settings], stuck_after: float, park_initial: float, every: float
) -> None:
    settings = settings_factory(
        automation={"stuck_after_seconds": stuck_after, "park_initial_seconds": park_initial}
    )
    assert beat_schedule(settings)["reconcile"]["schedule"] == pytest.approx(every)
