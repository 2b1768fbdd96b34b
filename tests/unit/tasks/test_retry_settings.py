"""The tasks' failure decisions follow the two schedule settings (``tasks.base.decide``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from certqueue.config import Settings
from certqueue.lifecycle.failure import TRANSIENT_IN_TASK_RETRIES, Action, Kind
from certqueue.tasks.base import decide


@pytest.mark.parametrize(("initial", "park_initial"), [(0.5, 7.0), (2.0, 120.0)])
def test_the_tasks_decide_with_the_configured_schedules(
    settings_factory: Callable[..., Settings], initial: float, park_initial: float
) -> None:
    settings_factory(
        automation={"transient_retry_initial_seconds": initial, "park_initial_seconds": park_initial}
    )
    first = decide(Kind.TRANSIENT, retries=0)
    assert first.action is Action.RETRY and 0.8 * initial <= first.delay <= 1.2 * initial  # jitter 20%
    parked = decide(Kind.TRANSIENT, retries=TRANSIENT_IN_TASK_RETRIES, parks=0)
    assert parked.action is Action.PARK and 0.8 * park_initial <= parked.delay <= 1.2 * park_initial
    assert decide(Kind.PERMANENT, retries=0).action is Action.FAIL
