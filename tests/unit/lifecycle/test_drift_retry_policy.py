"""Pure policies of issue 14: drift (lifecycle.drift), retries after the CA's refusal
(lifecycle.retry: automation.retry_attempts) and when a new issuance is ACTIVE
(lifecycle.states.active_on_issue: multi_region.propagation_strategy)."""

from __future__ import annotations

import random

import pytest

from certqueue.lifecycle.drift import Advance, advance, error_action, is_drift
from certqueue.lifecycle.retry import after_permanent_failure
from certqueue.lifecycle.states import active_on_issue


@pytest.mark.parametrize(
    ("deployed", "live", "want"),
    [("aa", "aa", False), ("aa", "bb", True), ("aa", None, True), (None, "aa", False), (None, None, False)],
)
def test_is_drift(deployed: str | None, live: str | None, want: bool) -> None:
    assert is_drift(deployed, live) is want


@pytest.mark.parametrize(
    ("reason", "action"),
    [
        ("aws_acm:auth", "stop"),
        ("azure_keyvault:auth", "stop"),
        ("gcp_certmanager:forbidden", "stop"),
        ("config", "stop"),
        ("aws_acm:unavailable", "skip"),
        ("local:invalid", "skip"),
        ("local:io", "skip"),
        ("aws_acm:ConnectTimeout", "skip"),
        ("vault:kv/prod:auth", "stop"),  # the kind is after the last colon, not the first
        ("vault:auth:timeout", "skip"),
    ],
)
def test_error_action(reason: str, action: str) -> None:
    assert error_action(reason) == action


@pytest.mark.parametrize(
    ("after", "last", "rows", "batch", "stopped", "want"),
    [
        (0, 1000, 1000, 1000, False, Advance(1000, False)),  # a full batch: more may follow
        (1000, 1500, 500, 1000, False, Advance(0, True)),  # the end: the pass is complete
        (0, None, 0, 1000, False, Advance(0, True)),  # nothing deployed in the region
        (200, 250, 50, 1000, True, Advance(250, False)),  # stopped (time budget): go on from 250
        (200, None, 10, 1000, True, Advance(200, False)),  # stopped at once (bad credentials): stay
        (200, None, 1000, 1000, False, Advance(200, False)),  # a full batch, none finished: stay
    ],
)
def test_advance(after: int, last: int | None, rows: int, batch: int, stopped: bool, want: Advance) -> None:
    assert advance(after, last, rows, batch, stopped=stopped) == want


@pytest.mark.parametrize(
    ("purpose", "attempts", "retries", "give_up", "low", "high"),
    [
        ("issue", 1, 3, False, 240, 360),  # 300 s with jitter
        ("issue", 2, 3, False, 480, 720),
        ("issue", 3, 3, False, 960, 1440),
        ("issue", 4, 3, True, 0, 0),  # the retries are spent: FAILED
        ("issue", 1, 0, True, 0, 0),  # retry_attempts 0: the first refusal is final
        ("renew", 1, 3, False, 240, 360),
        ("renew", 3, 3, False, 960, 1440),
        ("renew", 4, 3, False, 86400, 86400),  # later: once per check interval, never given up
        ("renew", 1, 0, False, 86400, 86400),
    ],
)
def test_after_permanent_failure(
    purpose: str, attempts: int, retries: int, give_up: bool, low: float, high: float
) -> None:
    out = after_permanent_failure(
        purpose,
        attempts,
        retry_attempts=retries,
        retry_delay=300,
        check_interval_hours=24,
        rng=random.Random(3),
    )
    assert out.give_up is give_up
    assert low <= out.delay <= high


def test_unknown_purpose_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^unknown purpose 'revoke'$"):
        after_permanent_failure("revoke", 1, retry_attempts=3, retry_delay=1, check_interval_hours=1)


@pytest.mark.parametrize("purpose", ["issue", "renew"])
def test_a_quick_retry_draws_its_jitter_from_the_rng_given(purpose: str) -> None:
    def delay(seed: int) -> float:
        return after_permanent_failure(
            purpose, 1, retry_attempts=3, retry_delay=300, check_interval_hours=24, rng=random.Random(seed)
        ).delay

    assert delay(11) == delay(11)  # the same seed, the same delay: reproducible with a seeded rng
    assert delay(11) != delay(12)


@pytest.mark.parametrize(
    ("strategy", "regions", "want"),
    [("sync", True, False), ("sync", False, True), ("async", True, True), ("async", False, True)],
)
def test_active_on_issue(strategy: str, regions: bool, want: bool) -> None:
    assert active_on_issue(strategy, regions) is want


def test_unknown_strategy_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"^unknown propagation strategy 'eventually'$"):
        active_on_issue("eventually", True)
