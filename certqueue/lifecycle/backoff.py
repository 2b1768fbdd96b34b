"""Retry timing: a pure policy (cert-manager's ``initial * 2^(n-1)``, capped, with full jitter)."""

from __future__ import annotations

import random


def backoff(
    attempt: int,
    *,
    initial: float,
    cap: float,
    jitter: float = 0.2,
    rng: random.Random | None = None,
    retry_after: float | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1).

    A remote ``retry_after`` is a floor: never retry sooner than the other side asked.
    """
    if attempt < 1:
        attempt = 1
    # float power with a bounded exponent: a huge attempt count must neither build a huge int
    # nor overflow its conversion to float (2.0**1000 is finite; the product may be inf, then cap)
    base = min(cap, initial * 2.0 ** min(attempt - 1, 1000))
    if jitter > 0:
        base *= 1 + jitter * (2 * (rng or random).random() - 1)
    base = min(max(base, 0.0), cap)
    if retry_after is not None:
        base = max(base, retry_after)
    return base
