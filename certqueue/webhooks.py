"""Webhook signatures in the Standard Webhooks form (https://www.standardwebhooks.com/), so a
receiver can check them with any of that spec's libraries, or with ``verify`` below.

Each request carries::

    webhook-id:        the event's idempotency key (the same on every attempt)
    webhook-timestamp: seconds since the epoch, when this attempt was signed
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

The key is the subscriber's secret: for a ``whsec_<base64>`` secret the decoded bytes, for any other
its UTF-8 bytes (``SubscriberSettings.secret_bytes``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

#: a receiver refuses a signature older (or newer) than this (seconds): a replayed request
DEFAULT_TOLERANCE = 300


class SignatureError(ValueError):
    """The request is not signed by the holder of the secret (or is too old)."""


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(key: bytes, msg_id: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    ts = int(now if now is not None else time.time())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(key, msg_id, ts, body),
        "idempotency-key": msg_id,
    }


def verify(
    key: bytes,
    request_headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> str:
    """Check a received request; returns its ``webhook-id``. Header names are case-insensitive."""
    h = {k.lower(): v for k, v in request_headers.items()}
    msg_id, ts_text, sigs = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    if not msg_id or not ts_text or not sigs:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(ts_text)
    except ValueError as exc:
        raise SignatureError("webhook-timestamp is not an integer") from exc
    if abs((now if now is not None else time.time()) - ts) > tolerance:
        raise SignatureError("webhook-timestamp outside the tolerance")
    expected = sign(key, msg_id, ts, body)
    # the header may list several signatures (a secret being rotated), separated by spaces
    if not any(hmac.compare_digest(expected, s) for s in sigs.split()):
        raise SignatureError("no signature matches")
    return msg_id
