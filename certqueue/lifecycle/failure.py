"""The one failure policy of the pipeline: what a task does with an error. Pure: no ORM, no queue.

Every task maps its exception to a kind (``certqueue.tasks.base.classify``) and asks :func:`decide`:

* ``transient`` (CA 5xx, network, DNS, PostgreSQL, Redis, a soft time limit): never fails a
  certificate. A few quick retries inside the task's message, then the work is *parked* in the
  database (``work_deadline`` in the future) and the reconciler resumes it, with growing delays
  and no message held meanwhile. A metric and an alert show parked work past a threshold.
* ``permanent`` (the CA's final answers: unauthorized, rejectedIdentifier, caa, an invalid order):
  the certificate fails (or falls back to its next CA, or a renewal is rescheduled).
* ``keystore`` (wrong or unreadable master key): the worker stops, the message is requeued and the
  certificate is untouched, since another worker with the right key can finish it.
* ``invalid_input``: a bad payload; the job fails and nothing is written.

A remote Retry-After is honoured as a floor and clamped: see :func:`clamp_retry_after`.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass

from certqueue.lifecycle.backoff import backoff

# --- the retry table (seconds) ----------------------------------------------------------------------
#: quick retries inside the task's own message before the work is parked in the database
TRANSIENT_IN_TASK_RETRIES = 5
#: delays of those quick retries: 1, 2, 4, 8, 16 s (with jitter)
TRANSIENT_INITIAL = 1.0
TRANSIENT_CAP = 60.0
#: parked work is resumed by the reconciler after 60 s, doubling per park, at most one hour
PARK_INITIAL = 60.0
PARK_CAP = 3600.0
#: the longest countdown any message may carry: the broker's visibility timeout must exceed it
MAX_COUNTDOWN = 900.0
#: the longest a CA's Retry-After may hold an order (polling, retries); longer is parked instead
MAX_ORDER_RETRY_AFTER = 900.0
#: the longest block a CA's rateLimited answer may put on a budget (Let's Encrypt's longest window)
MAX_RATE_LIMIT_BLOCK = 7 * 24 * 3600.0


class Kind(enum.StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    KEYSTORE = "keystore"
    INVALID_INPUT = "invalid_input"


class Action(enum.StrEnum):
    RETRY = "retry"  # retry this message after ``delay``
    PARK = "park"  # hand the work back to the database; resumed after ``delay``
    FAIL = "fail"  # record the permanent failure (fail, fall back or reschedule the renewal)
    STOP_WORKER = "stop_worker"  # requeue the message and stop this worker
    REJECT = "reject"  # a bad payload: the job fails, nothing written


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0


def clamp_retry_after(value: float | None, maximum: float) -> float | None:
    """A remote Retry-After made safe: None for missing, negative or not-a-number, at most ``maximum``
    (a ten-year Retry-After must neither overflow a countdown nor hold work for ten years)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return maximum  # an integer too large for a float: "a very long time"
    except (TypeError, ValueError):
        return None
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, maximum)


def decide(
    kind: Kind,
    *,
    retries: int,
    parks: int = 0,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    initial: float = TRANSIENT_INITIAL,
    park_initial: float = PARK_INITIAL,
) -> Decision:
    """What to do with an error of ``kind`` after ``retries`` quick retries of this message and
    ``parks`` earlier parkings of the same work. ``initial`` and ``park_initial`` start the two
    doubling schedules (``automation.transient_retry_initial_seconds`` and
    ``automation.park_initial_seconds``; the table's values by default)."""
    if kind is Kind.KEYSTORE:
        return Decision(Action.STOP_WORKER)
    if kind is Kind.INVALID_INPUT:
        return Decision(Action.REJECT)
    if kind is Kind.PERMANENT:
        return Decision(Action.FAIL)
    floor = clamp_retry_after(retry_after, MAX_ORDER_RETRY_AFTER)
    if retries < TRANSIENT_IN_TASK_RETRIES:
        delay = backoff(retries + 1, initial=initial, cap=TRANSIENT_CAP, rng=rng, retry_after=floor)
        return Decision(Action.RETRY, min(delay, MAX_COUNTDOWN))
    delay = backoff(parks + 1, initial=park_initial, cap=PARK_CAP, rng=rng, retry_after=floor)
    return Decision(Action.PARK, delay)


def countdown(seconds: float) -> float:
    """A countdown a message may carry (see MAX_COUNTDOWN)."""
    return max(0.0, min(float(seconds), MAX_COUNTDOWN))
