"""The two error kinds: what each exception means for a task (retry later, or fail for good)."""

import celery.exceptions
import kombu.exceptions
import pytest
import redis.exceptions
from sqlalchemy.exc import IntegrityError, OperationalError

from certqueue.errors import InvalidInput, PermanentError, ProviderError, RetryableError, TargetError
from certqueue.tasks.base import classify


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        (redis.exceptions.ConnectionError("down"), RetryableError, "redis"),
        (redis.exceptions.TimeoutError("slow"), RetryableError, "redis"),
        (
            OperationalError("select 1", {}, Exception("server closed the connection")),
            RetryableError,
            "database",
        ),
        (ConnectionResetError(), RetryableError, "network"),
        (TimeoutError(), RetryableError, "network"),
        (
            ProviderError("cloudflare", "429", retryable=True, reason="cloudflare:throttled"),
            RetryableError,
            "cloudflare:throttled",
        ),
        (
            ProviderError("cloudflare", "bad token", retryable=False, reason="cloudflare:auth"),
            PermanentError,
            "cloudflare:auth",
        ),
        (TargetError("aws_acm", "denied", reason="aws_acm:auth"), PermanentError, "aws_acm:auth"),
        (IntegrityError("insert", {}, Exception("duplicate")), PermanentError, "internal"),
        (KeyError("x"), PermanentError, "internal"),
        (InvalidInput("bad", field="domains"), InvalidInput, "invalid_input"),
        # a publish to a broker that is down: kombu's error is no OSError, and must not fail anything
        (kombu.exceptions.OperationalError("Error 111 connecting"), RetryableError, "broker"),
        # a step that ran past its soft time limit is tried again, never a permanent "internal"
        (celery.exceptions.SoftTimeLimitExceeded(), RetryableError, "timeout"),
    ],
)
def test_classify(exc, kind, reason):
    out = classify(exc)
    assert isinstance(out, kind)
    assert out.reason == reason


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (RetryableError("ca down", reason="acme:server"), "transient"),
        (PermanentError("no", reason="acme:unauthorized"), "permanent"),
        (InvalidInput("bad"), "invalid_input"),
    ],
)
def test_kind_of(exc, kind):
    from certqueue.errors import KeyStoreError
    from certqueue.tasks.base import kind_of

    assert kind_of(exc) == kind
    # a wrong or unreadable key file stops the worker; it never fails the certificate
    assert kind_of(KeyStoreError("wrong key", reason="keystore:unknown_kid")) == "keystore"
