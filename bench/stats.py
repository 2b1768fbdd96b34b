"""The harness's arithmetic: interleaved repetitions, median and spread, ratios, per-certificate costs.

Kept free of I/O so it is unit-tested on its own (``tests/unit/bench/test_bench_stats.py``).

* :func:`interleave` orders the runs A B C A B C ...: the machine's load drifts during a run, and
  running each contender's repetitions back to back would hand one contender the quiet minutes.
* :func:`spread` summarises one contender's repetitions: the median (what the table shows), the
  minimum and maximum, and the relative spread ``(max - min) / median``.
* :func:`ratio` divides medians, never best against worst.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def interleave(contenders: Sequence[T], repetitions: int) -> list[tuple[int, T]]:
    """``[(rep, contender), ...]`` in the order A B C A B C ... (``repetitions`` rounds)."""
    if repetitions < 1:
        raise ValueError("repetitions must be at least 1")
    return [(rep, c) for rep in range(repetitions) for c in contenders]


@dataclass(frozen=True)
class Spread:
    n: int
    median: float
    low: float
    high: float

    @property
    def relative(self) -> float | None:
        """``(high - low) / median``: 0.1 means the repetitions were within 10% of the median."""
        return (self.high - self.low) / self.median if self.median else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "n": self.n,
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "relative_spread": self.relative,
        }


def spread(values: Sequence[float | None]) -> Spread | None:
    """Median, min and max of the values that exist (a failed repetition gives None, skipped)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return Spread(n=len(xs), median=float(statistics.median(xs)), low=min(xs), high=max(xs))


def ratio(mine: float | None, theirs: float | None) -> float | None:
    """``mine / theirs`` (certqueue's median rate over a contender's), None when either is missing."""
    if not mine or not theirs:
        return None
    return mine / theirs


def per_cert(cpu_s: dict[str, float], certificates: int) -> dict[str, float | None]:
    """CPU seconds per certificate for each column, plus ``total`` (the sum of the columns; a
    ``client:<process>`` column is a detail of ``client``, not added again)."""
    out: dict[str, float | None] = {}
    for k, v in cpu_s.items():
        if k != "total":
            out[k] = v / certificates if certificates else None
    columns = [v for k, v in cpu_s.items() if k != "total" and not k.startswith("client:")]
    out["total"] = sum(columns) / certificates if certificates else None
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..1), None for no values."""
    if not values:
        return None
    if not 0 <= q <= 1:
        raise ValueError("q must be within 0..1")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
