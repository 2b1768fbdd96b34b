"""``/health/certificates``' "expiring soon" is a share of each certificate's lifetime (like
cert-manager's renewBeforePercentage) with an absolute floor and a cap: a fleet of 6-day
certificates renewed on time is healthy, where the old absolute 14-day threshold called every one
of them expiring. Table-driven on the pure threshold, then through the real database and API."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certqueue import certificates
from certqueue.config import MonitoringSettings, Settings
from certqueue.db import session_scope
from certqueue.health import certificate_health, expiring_threshold
from certqueue.models import State, utcnow

DAY = dt.timedelta(days=1)
NOW = utcnow().replace(microsecond=0)
_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    ("lifetime_days", "threshold"),
    [
        (90, dt.timedelta(days=13.5)),  # 15 %
        (45, dt.timedelta(days=6.75)),
        (6, dt.timedelta(days=0.9)),
        (2, dt.timedelta(hours=12)),  # 15 % is 7.2 h: the floor
        (365, dt.timedelta(days=14)),  # 15 % is 54.75 days: the cap (alert_threshold_days)
    ],
)
def test_threshold_is_a_share_of_the_lifetime_with_floor_and_cap(
    lifetime_days: int, threshold: dt.timedelta
) -> None:
    assert expiring_threshold(lifetime_days * DAY, MonitoringSettings()) == threshold


def _leaf(domain: str, not_before: dt.datetime, not_after: dt.datetime) -> tuple[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(_KEY, hashes.SHA256())
    )  # fmt: skip
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return pem, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def add(domain: str, lifetime_days: float, days_left: float) -> None:
    not_after = NOW + days_left * DAY
    with session_scope() as s:
        cert, _ = certificates.create_certificate(s, certificates.CertificateRequest.build(domains=[domain]))
        pem, key = _leaf(domain, not_after - lifetime_days * DAY, not_after)
        cert.current_issuance_id = certificates.store_issuance(s, cert, pem, key).id
        cert.state = State.ACTIVE


@pytest.fixture()
def fleet(db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    def make(**extra: object) -> Settings:
        return settings_factory(database_url=db_url, **extra)

    make()
    return make


def test_six_day_certificates_renewed_on_time_are_healthy(fleet: Callable[..., Settings]) -> None:
    # renewed at half their life (3 days left): a fleet anywhere in that cycle
    for i, left in enumerate((5.9, 4.5, 3.2, 3.0)):
        add(f"short{i}.health.example.com", 6, left)
    add("long.health.example.com", 90, 31)  # 90-day, just before its 30-day renewal point
    add("mid.health.example.com", 45, 16)
    h = certificate_health(NOW)
    assert (h.status, h.expiring_soon, h.expired, h.total) == ("healthy", 0, 0, 6)
    from fastapi.testclient import TestClient

    from certqueue.api.app import create_app

    with TestClient(create_app()) as client:  # the probe and dashboards' view of the same
        body = client.get("/health/certificates").json()
    assert (body["status"], body["expiring_soon"], body["total"]) == ("healthy", 0, 6)
    # the old rule (an absolute 14 days) called every 6-day certificate expiring soon
    assert certificate_health(NOW, threshold_days=14).expiring_soon == 4


@pytest.mark.parametrize(
    ("lifetime", "left", "soon"),
    [(6, 0.8, True), (6, 2.5, False), (45, 6.0, True), (45, 10, False), (90, 13, True), (90, 20, False)],
)
def test_missed_renewals_are_expiring_soon(
    fleet: Callable[..., Settings], lifetime: int, left: float, soon: bool
) -> None:
    add("one.health.example.com", lifetime, left)
    h = certificate_health(NOW)
    assert (h.status, h.expiring_soon) == (("degraded", 1) if soon else ("healthy", 0))


def test_the_settings_move_the_threshold(fleet: Callable[..., Settings]) -> None:
    add("six.health.example.com", 6, 2.5)
    assert certificate_health(NOW).status == "healthy"
    fleet(**{"monitoring.alert_threshold_percentage": 50})
    assert certificate_health(NOW).status == "degraded"
    fleet(**{"monitoring.alert_threshold_percentage": 50, "monitoring.alert_threshold_days": 2})
    assert certificate_health(NOW).status == "healthy"  # capped at 2 days
