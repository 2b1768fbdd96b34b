"""When to renew: a pure policy of the certificate's validity, the configured threshold and a clock.

The renewal window (time before expiry at which renewal starts):

* the configured ``renewal_threshold_days`` when that is less than half the lifetime;
* otherwise a third of the lifetime (certmagic's rule), or a half for lifetimes under 10 days
  (Let's Encrypt's advice for 6-day certificates).

So the guide's 30 days serves 90-day certificates as written, while 45-day and 6-day certificates
still renew at a sensible point instead of immediately after issuance. Jitter moves the renewal
earlier by up to ``jitter`` of the window, never later, so a fleet issued on one day spreads out.
"""

from __future__ import annotations

import datetime as dt
import random

SHORT_LIFETIME = dt.timedelta(days=10)


def renewal_window(not_before: dt.datetime, not_after: dt.datetime, threshold_days: float) -> dt.timedelta:
    lifetime = not_after - not_before
    if lifetime <= dt.timedelta(0):
        return dt.timedelta(0)
    threshold = dt.timedelta(days=threshold_days)
    if threshold < lifetime / 2:
        return threshold
    if lifetime < SHORT_LIFETIME:
        return lifetime / 2
    return lifetime / 3


def renew_at(
    not_before: dt.datetime,
    not_after: dt.datetime,
    threshold_days: float,
    *,
    jitter: float = 0.1,
    rng: random.Random | None = None,
) -> dt.datetime:
    """The moment renewal becomes due, with jitter in ``[0, jitter * window)`` taken off."""
    window = renewal_window(not_before, not_after, threshold_days)
    start = not_after - window
    if jitter <= 0 or window <= dt.timedelta(0):
        return start
    r = (rng or random).random()
    return start - window * (jitter * r)


def is_due(renew_time: dt.datetime | None, now: dt.datetime) -> bool:
    return renew_time is not None and renew_time <= now
