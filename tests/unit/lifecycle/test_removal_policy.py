"""certqueue.lifecycle.removal: which deployed copies a revocation or deletion removes, and the
retry of the regions that failed (each with its own attempt count, the deploys' backoff)."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from certqueue.lifecycle.removal import DeployedCopy, after_attempt, copies_to_remove

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
C = DeployedCopy


@pytest.mark.parametrize(
    ("copy", "policy", "removed"),
    [
        (C("a", "aws_acm", "arn:1", "deployed"), {"a": True}, True),
        (C("a", "aws_acm", "arn:1", "pending"), {"a": True}, True),  # a newer deploy pending: old copy served
        (C("a", "aws_acm", "arn:1", "failed"), {"a": True}, True),
        (C("a", "aws_acm", None, "pending"), {"a": True}, False),  # never uploaded anywhere
        (C("a", "aws_acm", "", "failed"), {"a": True}, False),
        (C("a", "aws_acm", "arn:1", "removed"), {"a": True}, False),  # done already
        (C("a", "aws_acm", "arn:1", "deployed"), {"a": False}, False),  # the region keeps it
        (C("gone", "local", "/srv/x", "deployed"), {"a": True}, False),  # region no longer configured
    ],
)
@pytest.mark.parametrize("why", ["revoke", "delete"])
def test_copies_to_remove(copy: DeployedCopy, policy: dict[str, bool], removed: bool, why: str) -> None:
    assert copies_to_remove([copy], policy, why) == ([copy] if removed else [])


def test_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^unknown removal reason 'expire'; known: revoke, delete$"):
        copies_to_remove([], {}, "expire")


def _targets(**attempts: int) -> dict[str, dict[str, object]]:
    return {r: {"provider": "local", "ref": f"/srv/{r}", "attempts": n} for r, n in attempts.items()}


def test_everything_removed_ends_the_removal() -> None:
    left, when = after_attempt(
        _targets(a=0, b=2), [{"region": "a", "status": "removed"}, {"region": "b", "status": "absent"}], NOW
    )
    assert (left, when) == ({}, None)


@pytest.mark.parametrize(
    ("attempts_before", "low", "high"),
    [(0, 8, 12), (1, 16, 24), (2, 32, 48), (3, 64, 96), (20, 1440, 1800)],  # 10 s doubling, cap 30 min
)
def test_a_failed_region_is_retried_with_the_deploys_backoff(
    attempts_before: int, low: float, high: float
) -> None:
    left, when = after_attempt(
        _targets(a=0, b=attempts_before),
        [{"region": "a", "status": "removed"}, {"region": "b", "status": "failed", "reason": "aws_acm:auth"}],
        NOW,
        rng=random.Random(1),
    )
    assert set(left) == {"b"}
    assert left["b"]["attempts"] == attempts_before + 1 and left["b"]["error"] == "aws_acm:auth"
    assert when is not None and low <= (when - NOW).total_seconds() <= high


def test_a_region_without_a_result_keeps_its_count_and_unknown_results_are_ignored() -> None:
    left, when = after_attempt(
        _targets(a=1, b=0), [{"region": "zzz", "status": "removed"}], NOW, rng=random.Random(2)
    )
    assert left == _targets(a=1, b=0) and when is not None
    assert 8 <= (when - NOW).total_seconds() <= 12  # the largest count so far (1): the first delay


def test_a_result_for_an_unknown_region_does_not_end_the_round() -> None:
    left, _ = after_attempt(
        _targets(a=0), [{"region": "zzz", "status": "failed"}, {"region": "a", "status": "removed"}], NOW
    )
    assert left == {}


def test_a_failure_without_a_reason_is_recorded_as_unknown_and_a_long_one_is_cut_to_128() -> None:
    left, _ = after_attempt(
        _targets(a=0, b=0),
        [{"region": "a", "status": "failed"}, {"region": "b", "status": "failed", "reason": "x" * 200}],
        NOW,
        rng=random.Random(1),
    )
    assert left["a"]["error"] == "unknown"
    assert left["b"]["error"] == "x" * 128


def test_the_retry_draws_its_jitter_from_the_rng_given() -> None:
    def when(seed: int) -> dt.datetime | None:
        return after_attempt(
            _targets(a=0), [{"region": "a", "status": "failed"}], NOW, rng=random.Random(seed)
        )[1]

    assert when(5) == when(5)  # the same seed, the same moment: reproducible with a seeded rng
    assert when(5) != when(6)
