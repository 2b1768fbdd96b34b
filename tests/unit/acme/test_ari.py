"""certqueue.acme.ari and certqueue.lifecycle.ari_policy: ids, URLs, parsing, timing (fake clock),
and fetching from a small local HTTP server."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest
import requests
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certqueue import crypto
from certqueue.acme.ari import (
    AriUnavailable,
    ari_cert_id,
    cert_id_from_info,
    fetch_renewal_info,
    parse_renewal_info,
    renewal_info_url,
)
from certqueue.certificates import _ari_cert_id
from certqueue.lifecycle.ari_policy import (
    RenewalInfo,
    choose_renewal_time,
    clamp_retry_after,
    next_ari_check,
)
from devstack.ports import free_port
from tests.fakes import FakeServer, Request, Response

NOW = dt.datetime(2030, 3, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def window(start: dt.timedelta, end: dt.timedelta, retry_after: float | None = None) -> RenewalInfo:
    return RenewalInfo(NOW + start, NOW + end, None, retry_after)


# --- certificate ids --------------------------------------------------------------------------------


def test_cert_id_matches_the_rfc_example() -> None:
    """RFC 9773 section 4.1: AKI 69:88:5B:...:D4 and serial 00:87:65:43:21."""
    from certqueue.acme.ari import _cert_id

    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    assert _cert_id(aki, 0x0087654321) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def make_cert(serial: int, with_aki: bool = True) -> x509.Certificate:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ari.example.com")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 89 * DAY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("ari.example.com")]), critical=False)
    )
    if with_aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


@pytest.mark.parametrize(
    ("serial", "serial_part"),
    [
        (0x0087654321, "AIdlQyE"),  # high bit set: a leading zero byte
        (0x7F, "fw"),
        (0x80, "AIA"),
        (0x0102, "AQI"),
        (1, "AQ"),
    ],
)
def test_cert_id_of_a_certificate(serial: int, serial_part: str) -> None:
    cert = make_cert(serial)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cid = ari_cert_id(pem)
    assert cid is not None and cid.split(".")[1] == serial_part
    assert ari_cert_id(cert) == ari_cert_id(pem.decode()) == cid
    info = crypto.cert_info(pem)
    assert cert_id_from_info(info) == cid
    assert _ari_cert_id(info) == cid  # certificates.py delegates here


def test_no_cert_id_without_authority_key_identifier() -> None:
    cert = make_cert(12345, with_aki=False)
    assert ari_cert_id(cert) is None
    assert cert_id_from_info(crypto.cert_info(cert.public_bytes(serialization.Encoding.PEM))) is None


# --- URLs -------------------------------------------------------------------------------------------

DIRECTORY = {
    "newNonce": "https://ca.test/nonce",
    "newAccount": "https://ca.test/acct",
    "newOrder": "https://ca.test/order",
    "renewalInfo": "https://ca.test/renewal-info",
}


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        (DIRECTORY, "https://ca.test/renewal-info/aYhb.AIdl"),
        ({**DIRECTORY, "renewalInfo": "https://ca.test/ari/"}, "https://ca.test/ari/aYhb.AIdl"),
        ({k: v for k, v in DIRECTORY.items() if k != "renewalInfo"}, None),
        (messages.Directory.from_json(DIRECTORY), "https://ca.test/renewal-info/aYhb.AIdl"),
        (messages.Directory.from_json({"newOrder": "https://ca.test/order"}), None),
    ],
)
def test_renewal_info_url(directory: Any, expected: str | None) -> None:
    assert renewal_info_url(directory, "aYhb.AIdl") == expected


# --- parsing ----------------------------------------------------------------------------------------


def body(start: str, end: str, **extra: Any) -> dict[str, Any]:
    return {"suggestedWindow": {"start": start, "end": end}, **extra}


@pytest.mark.parametrize(
    ("data", "start", "end", "explanation"),
    [
        (
            body("2030-03-10T00:00:00Z", "2030-03-12T00:00:00Z"),
            dt.datetime(2030, 3, 10),
            dt.datetime(2030, 3, 12),
            None,
        ),
        (
            body(
                "2030-03-10T00:00:00.123456789Z",
                "2030-03-12T01:02:03+01:00",
                explanationURL="https://ca.test/why",
            ),
            dt.datetime(2030, 3, 10, 0, 0, 0, 123456),
            dt.datetime(2030, 3, 12, 0, 2, 3),
            "https://ca.test/why",
        ),
        (
            body("2030-03-10T00:00:00Z", "2030-03-10T00:00:01Z", explanationURL=""),
            dt.datetime(2030, 3, 10),
            dt.datetime(2030, 3, 10, 0, 0, 1),
            None,
        ),
    ],
)
def test_parse_valid_windows(
    data: dict[str, Any], start: dt.datetime, end: dt.datetime, explanation: str | None
) -> None:
    info = parse_renewal_info(data, None, NOW)
    assert info.window_start == start.replace(tzinfo=dt.UTC)
    assert info.window_end == end.replace(tzinfo=dt.UTC)
    assert info.explanation_url == explanation
    assert info.retry_after_seconds is None
    assert RenewalInfo.from_json(info.to_json()) == info


@pytest.mark.parametrize(
    "data",
    [
        body("2030-03-12T00:00:00Z", "2030-03-10T00:00:00Z"),  # end before start: treat as no response
        body("2030-03-10T00:00:00Z", "2030-03-10T00:00:00Z"),  # empty window
        body("2030-03-10T00:00:00", "2030-03-12T00:00:00"),  # no offset
        body("yesterday", "2030-03-12T00:00:00Z"),
        {"suggestedWindow": {"start": "2030-03-10T00:00:00Z"}},
        {"window": {}},
        {"suggestedWindow": "soon"},
        [],
        None,
    ],
)
def test_parse_invalid_windows_is_a_long_term_error(data: Any) -> None:
    with pytest.raises(AriUnavailable) as err:
        parse_renewal_info(data, "60", NOW)
    assert err.value.reason == "ari:malformed"
    assert err.value.temporary is False
    assert err.value.retry_after == 6 * 3600


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("garbage", None),
        ("0", 60.0),  # at least a minute
        ("30", 60.0),
        ("3600", 3600.0),
        ("21600", 21600.0),
        ("86400", 86400.0),
        ("999999", 86400.0),  # at most a day
        ("Fri, 01 Mar 2030 14:00:00 GMT", 7200.0),  # an HTTP date, from the fake clock
    ],
)
def test_retry_after_is_clamped_to_a_minute_and_a_day(header: str | None, seconds: float | None) -> None:
    info = parse_renewal_info(body("2030-03-10T00:00:00Z", "2030-03-12T00:00:00Z"), header, NOW)
    assert info.retry_after_seconds == seconds


@pytest.mark.parametrize(("raw", "clamped"), [(None, None), (-5, 60), (59.9, 60), (61, 61), (86401, 86400)])
def test_clamp_retry_after(raw: float | None, clamped: float | None) -> None:
    assert clamp_retry_after(raw) == clamped


def test_renewal_info_refuses_naive_or_empty_windows() -> None:
    with pytest.raises(ValueError):
        RenewalInfo(dt.datetime(2030, 1, 1), dt.datetime(2030, 1, 2))
    with pytest.raises(ValueError):
        RenewalInfo(NOW, NOW)


# --- timing: pure, fake clock -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "r", "expected"),
    [
        (window(2 * DAY, 4 * DAY), 0.0, NOW + 2 * DAY),  # the start
        (window(2 * DAY, 4 * DAY), 0.5, NOW + 3 * DAY),  # uniform inside
        (window(2 * DAY, 4 * DAY), 0.999999, NOW + 2 * DAY + 2 * DAY * 0.999999),
        (window(-DAY, DAY), 0.75, NOW + DAY / 2),  # window open now, pick in the future
        (window(-DAY, DAY), 0.25, NOW),  # pick in the past: renew now
        (window(-3 * DAY, -2 * DAY), 0.5, NOW),  # window over (revoked, incident): now
        (window(-3 * DAY, -2 * DAY), 0.0, NOW),
        (window(-DAY, dt.timedelta(0)), 0.99, NOW),  # ends exactly now
    ],
)
def test_choose_renewal_time(info: RenewalInfo, r: float, expected: dt.datetime) -> None:
    assert choose_renewal_time(info, NOW, FixedRandom(r)) == expected


def test_choose_renewal_time_is_always_inside_the_window_or_now() -> None:
    rng = random.Random(7)
    info = window(-HOUR, 2 * DAY)
    picks = [choose_renewal_time(info, NOW, rng) for _ in range(2000)]
    assert all(NOW <= p < info.window_end for p in picks)
    future = [p for p in picks if p > NOW]
    # uniform: the part of the window still ahead holds about 48/49 of the picks, spread across it
    assert len(future) > 1900
    assert min(future) < NOW + 2 * HOUR and max(future) > info.window_end - 2 * HOUR


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (window(DAY, 2 * DAY, None), NOW + 6 * HOUR),  # no Retry-After: six hours
        (window(DAY, 2 * DAY, 120.0), NOW + dt.timedelta(seconds=120)),
        (window(DAY, 2 * DAY, 5.0), NOW + dt.timedelta(minutes=1)),  # clamped even if built unclamped
        (window(DAY, 2 * DAY, 10 * 86400.0), NOW + DAY),
        (None, NOW + 6 * HOUR),  # fetching failed for good
    ],
)
def test_next_ari_check(info: RenewalInfo | None, expected: dt.datetime) -> None:
    assert next_ari_check(info, NOW) == expected


# --- fetching -----------------------------------------------------------------------------------------


class RenewalInfoServer(FakeServer):
    """Answers GET /ari/<id> with ``answers[id]`` (status, body, headers)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Response] = {}

    def handle(self, req: Request) -> Response:
        cid = req.path.rsplit("/", 1)[-1]
        return self.answers.get(cid, Response(404, {"type": "urn:ietf:params:acme:error:malformed"}))


@pytest.fixture
def ari_server() -> Any:
    server = RenewalInfoServer().start()
    yield server
    server.stop()


def test_fetch_parses_window_and_retry_after(ari_server: RenewalInfoServer) -> None:
    ari_server.answers["abc.AQ"] = Response(
        200,
        body("2030-03-10T00:00:00Z", "2030-03-12T00:00:00Z", explanationURL="https://ca.test/x"),
        {"Retry-After": "21600"},
    )
    with requests.Session() as session:
        info = fetch_renewal_info(session, f"{ari_server.url}/ari/abc.AQ", verify=True, timeout=5, now=NOW)
    assert info == RenewalInfo(
        dt.datetime(2030, 3, 10, tzinfo=dt.UTC),
        dt.datetime(2030, 3, 12, tzinfo=dt.UTC),
        "https://ca.test/x",
        21600.0,
    )
    (req,) = ari_server.requests
    assert req.method == "GET" and "authorization" not in req.headers  # unauthenticated, one request


@pytest.mark.parametrize(
    ("answer", "reason", "temporary", "retry_after"),
    [
        (Response(404, {"type": "x"}), "ari:not_found", False, 21600),
        (Response(400, {"type": "x"}), "ari:http_400", False, 21600),
        (Response(200, b"<html>not json</html>"), "ari:malformed", False, 21600),
        (
            Response(
                200, {"suggestedWindow": {"start": "2030-03-12T00:00:00Z", "end": "2030-03-10T00:00:00Z"}}
            ),
            "ari:malformed",
            False,
            21600,
        ),
        (Response(503, None, {"Retry-After": "120"}), "ari:server", True, 120),
        (Response(500, None), "ari:server", True, None),
        (Response(429, None, {"Retry-After": "5"}), "ari:rateLimited", True, 60),
    ],
)
def test_fetch_errors(
    ari_server: RenewalInfoServer, answer: Response, reason: str, temporary: bool, retry_after: float | None
) -> None:
    ari_server.answers["id.AQ"] = answer
    with requests.Session() as session, pytest.raises(AriUnavailable) as err:
        fetch_renewal_info(session, f"{ari_server.url}/ari/id.AQ", timeout=5, now=NOW)
    assert (err.value.reason, err.value.temporary, err.value.retry_after) == (reason, temporary, retry_after)


def test_fetch_network_failure_is_temporary() -> None:
    with requests.Session() as session, pytest.raises(AriUnavailable) as err:
        fetch_renewal_info(session, f"http://127.0.0.1:{free_port()}/ari/x.AQ", timeout=2)
    assert err.value.reason == "ari:network" and err.value.temporary
