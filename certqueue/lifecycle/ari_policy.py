"""When to renew and when to ask again, from ACME Renewal Information (RFC 9773): pure policy.

Owns no state: functions of a :class:`RenewalInfo`, a clock and a random source.

* :func:`choose_renewal_time`: a uniformly random moment inside the CA's suggested window (RFC 9773
  section 4.2); a moment already past, or a window already over (the CA revoked the certificate or
  asks for early renewal after an incident), means now.
* :func:`next_ari_check`: when to fetch the renewal information again: after the response's
  Retry-After, clamped to [1 minute, 1 day] as section 4.3 advises; 6 hours without one.
* :func:`clamp_retry_after`: that clamp, for callers holding a raw header value.

A CA without ARI has no :class:`RenewalInfo`; the caller then keeps the lifetime rule of
:mod:`certqueue.lifecycle.renewal`.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

#: RFC 9773 section 4.3: treat shorter Retry-After values as one minute...
MIN_RETRY_AFTER = dt.timedelta(minutes=1)
#: ...and longer ones as one day
MAX_RETRY_AFTER = dt.timedelta(days=1)
#: when the CA gives no Retry-After (or fetching failed for good): ask again in six hours
DEFAULT_CHECK_INTERVAL = dt.timedelta(hours=6)


@dataclass(frozen=True)
class RenewalInfo:
    """A CA's renewal information for one certificate: ``suggestedWindow`` as aware UTC datetimes
    (``window_start < window_end``), its ``explanationURL``, and the Retry-After in seconds already
    clamped (None when the CA sent none)."""

    window_start: dt.datetime
    window_end: dt.datetime
    explanation_url: str | None = None
    retry_after_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.window_start.tzinfo is None or self.window_end.tzinfo is None:
            raise ValueError("renewal window needs timezone-aware datetimes")
        if self.window_end <= self.window_start:
            raise ValueError("renewal window must end after it starts")

    def to_json(self) -> dict[str, object]:
        return {
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "explanation_url": self.explanation_url,
            "retry_after_seconds": self.retry_after_seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> RenewalInfo:
        ra = data.get("retry_after_seconds")
        return cls(
            window_start=dt.datetime.fromisoformat(str(data["window_start"])),
            window_end=dt.datetime.fromisoformat(str(data["window_end"])),
            explanation_url=str(data["explanation_url"]) if data.get("explanation_url") else None,
            retry_after_seconds=float(ra) if isinstance(ra, int | float | str) else None,
        )


def clamp_retry_after(seconds: float | None) -> float | None:
    """A Retry-After in seconds clamped to [1 minute, 1 day]; None stays None."""
    if seconds is None:
        return None
    return min(max(seconds, MIN_RETRY_AFTER.total_seconds()), MAX_RETRY_AFTER.total_seconds())


def choose_renewal_time(info: RenewalInfo, now: dt.datetime, rng: random.Random | None = None) -> dt.datetime:
    """A uniformly random time in ``[window_start, window_end)``; ``now`` if that time is not in the
    future (which is always the case when the whole window is past)."""
    if info.window_end <= now:
        return now
    span = info.window_end - info.window_start
    chosen = info.window_start + span * (rng or random).random()
    return max(chosen, now)


def next_ari_check(info: RenewalInfo | None, now: dt.datetime) -> dt.datetime:
    """When to fetch the renewal information again: Retry-After (clamped) after ``now``, else six
    hours. ``info`` None (the fetch failed for good) also means six hours."""
    seconds = clamp_retry_after(info.retry_after_seconds) if info is not None else None
    return now + (dt.timedelta(seconds=seconds) if seconds is not None else DEFAULT_CHECK_INTERVAL)
