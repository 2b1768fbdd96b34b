"""What follows the CA's permanent answer to an issuance or a renewal: the guide's
``automation.retry_attempts`` and ``retry_delay_seconds``. Pure policy; owns no state.

* A first issuance is tried again up to ``retry_attempts`` times (``retry_delay_seconds``, doubling,
  at most 6 hours); then it is FAILED (the guide's "retry from FAILED" is a new request).
* A renewal is never given up while the old certificate is served: the first ``retry_attempts``
  retries come quickly (the same table), later ones once per ``check_interval_hours``, so a
  certificate whose CA keeps refusing does not hammer it, and the "renewal overdue" and expiry
  alerts tell a person.

``attempts`` counts the failures so far, this one included (1 after the first failure).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from certqueue.lifecycle.backoff import backoff

#: the quick retries' longest delay (seconds)
QUICK_RETRY_CAP = 6 * 3600.0


@dataclass(frozen=True)
class AfterFailure:
    give_up: bool
    delay: float = 0.0


def after_permanent_failure(
    purpose: str,
    attempts: int,
    *,
    retry_attempts: int,
    retry_delay: float,
    check_interval_hours: float,
    rng: random.Random | None = None,
) -> AfterFailure:
    if purpose not in ("issue", "renew"):
        raise ValueError(f"unknown purpose {purpose!r}")
    quick = attempts <= retry_attempts
    if purpose == "issue" and not quick:
        return AfterFailure(give_up=True)
    if quick:
        cap = max(retry_delay, QUICK_RETRY_CAP)
        return AfterFailure(False, backoff(max(attempts, 1), initial=retry_delay, cap=cap, rng=rng))
    return AfterFailure(False, check_interval_hours * 3600.0)
