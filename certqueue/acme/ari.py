"""ACME Renewal Information (RFC 9773): certificate ids, the ``renewalInfo`` resource, and its responses.

Owns no state: the caller stores what :func:`fetch_renewal_info` returns (the renewal time it chose,
when to ask again). The timing decisions are pure and live in :mod:`certqueue.lifecycle.ari_policy`
(re-exported here): :func:`choose_renewal_time`, :func:`next_ari_check`.

* :func:`ari_cert_id` / :func:`cert_id_from_info`: ``base64url(AKI keyIdentifier) "."
  base64url(serial as DER INTEGER contents)`` (section 4.1).
* :func:`renewal_info_url`: the directory's ``renewalInfo`` URL with the id appended; None when the
  CA has no ARI (then the lifetime rule of :mod:`certqueue.lifecycle.renewal` applies).
* :func:`fetch_renewal_info`: one unauthenticated GET with a timeout. Failures are
  :class:`AriUnavailable` (a ``RetryableError``: ARI trouble never fails a certificate). Temporary
  ones (network, 5xx, 429) carry the server's Retry-After if any, for the caller's backoff; long-term
  ones (other 4xx, a malformed body, an invalid window, section 4.2-4.3) carry six hours, after which
  the caller asks again, renewing on the lifetime rule meanwhile.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

import requests
from cryptography import x509

from certqueue.acme.errors import parse_retry_after
from certqueue.errors import RetryableError
from certqueue.lifecycle.ari_policy import (
    DEFAULT_CHECK_INTERVAL,
    RenewalInfo,
    choose_renewal_time,
    clamp_retry_after,
    next_ari_check,
)

__all__ = [
    "AriUnavailable",
    "RenewalInfo",
    "ari_cert_id",
    "cert_id_from_info",
    "choose_renewal_time",
    "fetch_renewal_info",
    "next_ari_check",
    "parse_renewal_info",
    "renewal_info_url",
]

_LONG_TERM = DEFAULT_CHECK_INTERVAL.total_seconds()


class AriUnavailable(RetryableError):
    """No usable renewal information this time; ``retry_after`` says when to ask again (seconds),
    ``temporary`` whether backoff applies (network, 5xx) or the six-hour long-term wait."""

    reason = "ari:unavailable"

    def __init__(self, message: str, *, reason: str, retry_after: float | None, temporary: bool) -> None:
        super().__init__(message, reason=reason, retry_after=retry_after)
        self.temporary = temporary


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _serial_der(serial: int) -> bytes:
    """The contents octets of the DER INTEGER: big-endian two's complement, minimal length (a leading
    zero byte when the high bit is set)."""
    if serial < 0:
        raise ValueError("certificate serial numbers are positive")
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big")


def _cert_id(aki: bytes, serial: int) -> str:
    return f"{_b64(aki)}.{_b64(_serial_der(serial))}"


def ari_cert_id(cert: x509.Certificate | str | bytes) -> str | None:
    """The RFC 9773 certificate id of a certificate (PEM or parsed; the first of a chain); None when
    it has no Authority Key Identifier keyIdentifier (then the CA cannot offer ARI for it)."""
    if not isinstance(cert, x509.Certificate):
        data = cert.encode() if isinstance(cert, str) else cert
        cert = x509.load_pem_x509_certificates(data)[0]
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    if not aki.key_identifier:
        return None
    return _cert_id(aki.key_identifier, cert.serial_number)


def cert_id_from_info(info: Any) -> str | None:
    """The certificate id from a :class:`certqueue.crypto.CertInfo` (hex AKI, hex serial)."""
    if not info.authority_key_id:
        return None
    return _cert_id(bytes.fromhex(info.authority_key_id), int(info.serial, 16))


def _directory_json(directory: Any) -> Mapping[str, Any]:
    if isinstance(directory, Mapping):
        return directory
    data: Mapping[str, Any] = directory.to_partial_json()  # acme.messages.Directory
    return data


def renewal_info_url(directory: Any, cert_id: str) -> str | None:
    """``<renewalInfo>/<cert_id>``, or None when the directory (an ``acme.messages.Directory`` or its
    JSON) has no ``renewalInfo``."""
    base = _directory_json(directory).get("renewalInfo")
    if not base or not isinstance(base, str):
        return None
    return f"{base.rstrip('/')}/{cert_id}"


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _timestamp(value: Any, field: str) -> dt.datetime:
    """An RFC 3339 timestamp; nanosecond fractions (Go servers) are cut to microseconds."""
    if not isinstance(value, str):
        raise ValueError(f"{field} is not a timestamp")
    text = _FRACTION.sub(r"\1", value.strip())
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"{field} has no UTC offset")
    return when.astimezone(dt.UTC)


def parse_renewal_info(
    body: Any, retry_after: str | None = None, now: dt.datetime | None = None
) -> RenewalInfo:
    """A ``RenewalInfo`` from a response body (parsed JSON) and its Retry-After header.

    Raises :class:`AriUnavailable` (long-term, ``ari:malformed``) for a body without a valid window,
    including one whose end does not follow its start (section 4.2: treat as no response).
    """
    try:
        window = body["suggestedWindow"]
        start = _timestamp(window["start"], "suggestedWindow.start")
        end = _timestamp(window["end"], "suggestedWindow.end")
        explanation = body.get("explanationURL")
        return RenewalInfo(
            window_start=start,
            window_end=end,
            explanation_url=explanation if isinstance(explanation, str) and explanation else None,
            retry_after_seconds=clamp_retry_after(parse_retry_after(retry_after, now)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AriUnavailable(
            f"renewal information is malformed ({type(exc).__name__})",
            reason="ari:malformed",
            retry_after=_LONG_TERM,
            temporary=False,
        ) from exc


def fetch_renewal_info(
    client_or_session: Any,
    url: str,
    verify: str | bool | None = None,
    timeout: float = 10.0,
    *,
    now: dt.datetime | None = None,
) -> RenewalInfo:
    """GET ``url`` (from :func:`renewal_info_url`) and parse it; unauthenticated, one request.

    ``client_or_session`` is an :class:`certqueue.acme.client.AcmeClient` (its HTTP session and TLS
    trust are used) or a ``requests.Session``. ``verify`` overrides the TLS trust (a CA bundle path,
    True, False); ``timeout`` bounds the request.
    """
    net = getattr(client_or_session, "net", None)
    session: requests.Session = net.session if net is not None else client_or_session
    if verify is None:
        verify = getattr(net, "verify_ssl", True) if net is not None else True
    try:
        response = session.get(url, verify=verify, timeout=timeout, headers={"Accept": "application/json"})
    except requests.RequestException as exc:
        raise AriUnavailable(
            f"renewal information: cannot reach the CA ({type(exc).__name__})",
            reason="ari:network",
            retry_after=None,
            temporary=True,
        ) from exc
    header = response.headers.get("Retry-After")
    status = response.status_code
    if status >= 500 or status == 429:
        raise AriUnavailable(
            f"renewal information: HTTP {status} from the CA",
            reason="ari:server" if status >= 500 else "ari:rateLimited",
            retry_after=clamp_retry_after(parse_retry_after(header, now)),
            temporary=True,
        )
    if status != 200:
        raise AriUnavailable(
            f"renewal information: HTTP {status} from the CA",
            reason="ari:not_found" if status == 404 else f"ari:http_{status}",
            retry_after=_LONG_TERM,
            temporary=False,
        )
    try:
        body = response.json()
    except ValueError as exc:
        raise AriUnavailable(
            "renewal information is not JSON", reason="ari:malformed", retry_after=_LONG_TERM, temporary=False
        ) from exc
    return parse_renewal_info(body, header, now)
