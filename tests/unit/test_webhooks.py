"""certqueue.webhooks: Standard Webhooks signatures, checked against an HMAC computed here by hand."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from certqueue.webhooks import SignatureError, headers, sign, verify

KEY = b"k" * 32
BODY = b'{"id":"evt_1","type":"certificate.issued"}'


def test_signature_is_hmac_sha256_of_id_timestamp_body() -> None:
    mac = hmac.new(KEY, b"evt_1.1700000000." + BODY, hashlib.sha256).digest()
    assert sign(KEY, "evt_1", 1_700_000_000, BODY) == "v1," + base64.b64encode(mac).decode()


def test_headers_round_trip_through_verify() -> None:
    h = headers(KEY, "evt_1", BODY, now=1_700_000_000)
    assert h["webhook-id"] == h["idempotency-key"] == "evt_1"
    assert verify(KEY, {k.upper(): v for k, v in h.items()}, BODY, now=1_700_000_100) == "evt_1"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),
        lambda h, b: ({**h, "webhook-id": "evt_2"}, b),
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
        lambda h, b: ({**h, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
    ],
)
def test_any_change_is_refused(tamper) -> None:
    h, b = tamper(headers(KEY, "evt_1", BODY, now=1_700_000_000), BODY)
    with pytest.raises(SignatureError):
        verify(KEY, h, b, now=1_700_000_000)


def test_wrong_key_is_refused() -> None:
    with pytest.raises(SignatureError):
        verify(b"other", headers(KEY, "evt_1", BODY, now=1_700_000_000), BODY, now=1_700_000_000)


def test_old_signature_is_refused() -> None:
    h = headers(KEY, "evt_1", BODY, now=1_700_000_000)
    assert verify(KEY, h, BODY, now=1_700_000_300) == "evt_1"
    with pytest.raises(SignatureError, match="tolerance"):
        verify(KEY, h, BODY, now=1_700_000_301)


def test_one_of_several_signatures_matches() -> None:
    h = headers(KEY, "evt_1", BODY, now=1_700_000_000)
    h["webhook-signature"] = "v1,AAAA " + h["webhook-signature"]
    assert verify(KEY, h, BODY, now=1_700_000_000) == "evt_1"
