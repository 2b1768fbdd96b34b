"""The Prometheus exporter against a real (temporary SQLite) database and the real Redis broker:
a known fleet and event log in, the exposition parsed with prometheus_client's own parser, values
checked; the per-certificate series cap; broker and database outages; ``promtool check metrics``."""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from certqueue import __version__, certificates, events, metrics
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.models import Certificate, Deployment, Issuance, RateBudget, State, utcnow
from devstack.ports import free_port
from tests.conftest_redis import process_redis_url

NOW = utcnow().replace(microsecond=0)

_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certqueue metrics test CA")])


def leaf(domains: list[str], not_after: dt.datetime) -> tuple[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]))
        .issuer_name(_CA_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=90))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
        .sign(_CA_KEY, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def add(domains: list[str], state: State, days_left: float | None = None) -> str:
    with session_scope() as s:
        cert, _ = certificates.create_certificate(s, certificates.CertificateRequest.build(domains=domains))
        if days_left is not None:
            pem, key = leaf(domains, NOW + dt.timedelta(days=days_left))
            iss = certificates.store_issuance(s, cert, pem, key)
            cert.current_issuance_id = iss.id
        cert.state = state
        return cert.id


@pytest.fixture()
def install(db_url: str, settings_factory: Callable[..., Settings]) -> Callable[..., Settings]:
    """Install settings for the test database (SQLite, and PostgreSQL when reachable) and Redis."""

    def make(**extra: Any) -> Settings:
        return settings_factory(database_url=db_url, **{"broker.url": process_redis_url(), **extra})

    make()
    return make


@pytest.fixture()
def db(install: Callable[..., Settings], tmp_path: Path) -> Path:
    return tmp_path


def scrape(clock: dt.datetime = NOW) -> tuple[str, dict[str, Any]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.CertqueueCollector(clock=lambda: clock))
    text = generate_latest(registry).decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def samples(
    families: dict[str, Any], family: str, suffix: str = ""
) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in families[family].samples
        if s.name == family + suffix
    }


def test_fleet_and_events(db: Path, install: Callable[..., Settings]) -> None:
    a = add(["a.example.com", "www.a.example.com"], State.ACTIVE, 10)
    b = add(["b.example.com"], State.RENEWING, 2.5)
    c = add(["c.example.com"], State.EXPIRED, -1)
    d = add(["d.example.com"], State.ACTIVE, -0.5)
    add(["e.example.com"], State.REQUESTED)
    add(["f.example.com"], State.REVOKED, 50)
    add(["g.example.com"], State.FAILED)
    with session_scope() as s:
        for kind, reason, n in (
            ("renewal", "success", 3),
            ("renewal", "failure", 2),
            ("issuance", "success", 4),
            ("issuance", "failure", 1),
        ):
            for _ in range(n):
                events.record(s, a, kind, reason=reason)
        for typ, n in (("http-01", 2), ("dns-01", 1)):
            for _ in range(n):
                events.record(s, a, "validation_error", reason="acme:unauthorized", data={"type": typ})
        for region, reason, n in (
            ("eu-west", "success", 5),
            ("eu-west", "failure", 1),
            ("us-east", "success", 2),
        ):
            for _ in range(n):
                events.record(s, a, "propagation", reason=reason, data={"region": region})
        events.record(s, a, "transition", reason="noise")  # other kinds are not counted
        for cid, region, status, age_min in (
            (a, "eu-west", "deployed", 1),
            (b, "eu-west", "pending", 40),
            (c, "eu-west", "failed", 3),
            (d, "eu-west", "pending", 10),
            (a, "us-east", "pending", 5),
        ):
            s.add(
                Deployment(
                    certificate_id=cid,
                    region=region,
                    provider="local",
                    status=status,
                    updated_at=NOW - dt.timedelta(minutes=age_min),
                )
            )
        s.add(RateBudget(key="orders:acct1", window_start=NOW, used=10, limit=300))
        s.add(
            RateBudget(
                key="domain:example.com",
                window_start=NOW,
                used=50,
                limit=50,
                blocked_until=NOW + dt.timedelta(hours=1),
            )
        )
        s.add(
            RateBudget(
                key="failed:x.example.com",
                window_start=NOW,
                used=1,
                limit=5,
                blocked_until=NOW - dt.timedelta(hours=1),
            )
        )

    _text, fam = scrape()

    # certqueue_ names, seconds, certificate_id only (monitoring.domain_labels is off by default)
    stamps = samples(fam, "certqueue_certificate_expiration_timestamp_seconds")
    assert {k: (v - NOW.timestamp()) / 86400 for k, v in stamps.items()} == {
        (("certificate_id", d),): pytest.approx(-0.5),
        (("certificate_id", c),): pytest.approx(-1),
        (("certificate_id", b),): pytest.approx(2.5),
        (("certificate_id", a),): pytest.approx(10),
    }
    lifetimes = {
        k: stamps[k] - v
        for k, v in samples(fam, "certqueue_certificate_not_before_timestamp_seconds").items()
    }
    assert set(lifetimes.values()) == {90 * 86400.0}
    assert 'domain="' not in _text
    assert samples(fam, "certqueue_renewals", "_total") == {
        (("status", "success"),): 3,
        (("status", "failure"),): 2,
    }
    assert samples(fam, "certqueue_issuances", "_total") == {
        (("status", "success"),): 4,
        (("status", "failure"),): 1,
    }
    assert samples(fam, "certqueue_validation_errors", "_total") == {
        (("type", "http-01"),): 2,
        (("type", "dns-01"),): 1,
    }
    assert (
        samples(fam, "certqueue_propagations", "_total")[(("region", "eu-west"), ("status", "success"))] == 5
    )
    assert {k[0][1]: v for k, v in samples(fam, "certqueue_certificates").items()}["ACTIVE"] == 2
    seconds = {
        dict(k)["le"]: v for k, v in samples(fam, "certqueue_certificate_expiry_seconds", "_bucket").items()
    }
    assert seconds[str(14 * 86400.0)] == 3 and seconds["0.0"] == 1 and seconds[str(86400.0 * 3)] == 2
    assert samples(fam, "certqueue_certificate_expiry_seconds", "_sum")[()] == pytest.approx(
        12.0 * 86400, abs=100
    )
    (build,) = samples(fam, "certqueue_build_info")
    assert dict(build)["version"] == __version__
    assert {f.removesuffix("_total") for f in metrics.FAMILIES} == set(fam)

    # the guide's names, as before, with monitoring.guide_names (and domain labels) turned on
    install(**{"monitoring.guide_names": True, "monitoring.domain_labels": True})
    _text, fam = scrape()
    days = samples(fam, "certificate_days_until_expiration")
    assert days == {
        (("certificate_id", d), ("domain", "d.example.com")): pytest.approx(-0.5),
        (("certificate_id", c), ("domain", "c.example.com")): pytest.approx(-1),
        (("certificate_id", b), ("domain", "b.example.com")): pytest.approx(2.5),
        (("certificate_id", a), ("domain", "a.example.com")): pytest.approx(10),
    }
    stamps = samples(fam, "certificate_expiration_timestamp_seconds")
    assert (
        stamps[(("certificate_id", a), ("domain", "a.example.com"))]
        == (NOW + dt.timedelta(days=10)).timestamp()
    )

    assert samples(fam, "certificate_renewal", "_total") == {
        (("status", "success"),): 3,
        (("status", "failure"),): 2,
    }
    assert samples(fam, "certificate_issuance", "_total") == {
        (("status", "success"),): 4,
        (("status", "failure"),): 1,
    }
    assert samples(fam, "certificate_validation_errors", "_total") == {
        (("type", "http-01"),): 2,
        (("type", "dns-01"),): 1,
    }
    assert samples(fam, "certificate_propagation", "_total") == {
        (("region", "eu-west"), ("status", "success")): 5,
        (("region", "eu-west"), ("status", "failure")): 1,
        (("region", "us-east"), ("status", "success")): 2,
    }

    by_state = samples(fam, "certificates")
    assert {k[0][1]: v for k, v in by_state.items()} == {
        "REQUESTED": 1,
        "ISSUING": 0,
        "ISSUED": 0,
        "ACTIVE": 2,
        "RENEWING": 1,
        "REVOKED": 1,
        "EXPIRED": 1,
        "FAILED": 1,
    }

    # in service: a (10 d), b (2.5 d), d (-0.5 d); the EXPIRED-state one is not in the histogram
    buckets = {dict(k)["le"]: v for k, v in samples(fam, "certificate_expiry_days", "_bucket").items()}
    assert buckets == {
        "0.0": 1,
        "1.0": 1,
        "3.0": 2,
        "7.0": 2,
        "14.0": 3,
        "21.0": 3,
        "30.0": 3,
        "45.0": 3,
        "60.0": 3,
        "90.0": 3,
        "+Inf": 3,
    }
    assert samples(fam, "certificate_expiry_days", "_count") == {(): 3}
    assert samples(fam, "certificate_expiry_days", "_sum")[()] == pytest.approx(12.0, abs=1e-3)

    assert samples(fam, "certqueue_deployments") == {
        (("region", "eu-west"), ("status", "deployed")): 1,
        (("region", "eu-west"), ("status", "pending")): 2,
        (("region", "eu-west"), ("status", "failed")): 1,
        (("region", "us-east"), ("status", "deployed")): 0,
        (("region", "us-east"), ("status", "pending")): 1,
        (("region", "us-east"), ("status", "failed")): 0,
    }
    assert samples(fam, "certqueue_region_pending_oldest_seconds") == {
        (("region", "eu-west"),): pytest.approx(2400, abs=1),
        (("region", "us-east"),): pytest.approx(300, abs=1),
    }
    assert samples(fam, "certqueue_rate_limit_budget_remaining") == {
        (("key", "domain:example.com"),): 0,
        (("key", "failed:x.example.com"),): 4,
        (("key", "orders:acct1"),): 290,
    }
    assert samples(fam, "certqueue_certificate_series_omitted") == {(): 0}
    assert samples(fam, "certqueue_database_up") == {(): 1}
    assert samples(fam, "certqueue_broker_up") == {(): 1}
    assert {f.removesuffix("_total") for f in (*metrics.FAMILIES, *metrics.GUIDE_ALIASES)} == set(fam)


def test_series_cap_keeps_the_soonest(db: Path, install: Callable[..., Settings], tmp_path: Path) -> None:
    install(**{"monitoring.max_certificate_series": 5})
    days = list(range(1, 21))
    random.Random(7).shuffle(days)
    ids = {add([f"n{d}.cap.example.com"], State.ACTIVE, d): d for d in days}
    _text, fam = scrape()
    series = samples(fam, "certqueue_certificate_expiration_timestamp_seconds")
    assert sorted(round((v - NOW.timestamp()) / 86400) for v in series.values()) == [1, 2, 3, 4, 5]
    assert {dict(k)["certificate_id"] for k in series} == {cid for cid, d in ids.items() if d <= 5}
    assert len(samples(fam, "certqueue_certificate_not_before_timestamp_seconds")) == 5
    assert samples(fam, "certqueue_certificate_series_omitted") == {(): 15}
    assert samples(fam, "certqueue_certificate_expiry_seconds", "_count") == {(): 20}  # aggregates see all
    install(**{"monitoring.max_certificate_series": 0})
    _text, fam = scrape()
    assert samples(fam, "certqueue_certificate_expiration_timestamp_seconds") == {}
    assert samples(fam, "certqueue_certificate_series_omitted") == {(): 20}


def test_empty_database_exposes_every_state_and_zero_counters(db: Path) -> None:
    _text, fam = scrape()
    assert len(samples(fam, "certqueue_certificates")) == len(State)
    assert samples(fam, "certqueue_renewals", "_total") == {
        (("status", "success"),): 0,
        (("status", "failure"),): 0,
    }
    assert samples(fam, "certqueue_certificate_expiry_seconds", "_count") == {(): 0}
    assert samples(fam, "certqueue_certificates_renewal_overdue") == {(): 0}


def test_queue_depth_from_redis(db: Path, install: Callable[..., Settings]) -> None:
    client = redis.Redis.from_url(process_redis_url(), socket_timeout=5)
    base = metrics.queue_depths(install())
    assert base is not None and {"scan", "acme", "dns"} <= set(base)
    marker = [f"metrics-test-{time.time_ns()}-{i}" for i in range(3)]
    client.lpush("dns", marker[0], marker[1])
    client.lpush("dns\x06\x163", marker[2])  # a priority list of the same queue
    try:
        _text, fam = scrape()
        assert samples(fam, "certqueue_queue_depth")[(("pool", "dns"), ("queue", "dns"))] == base["dns"] + 3
    finally:
        for m in marker[:2]:
            client.lrem("dns", 0, m)
        client.lrem("dns\x06\x163", 0, marker[2])


def test_broker_down_is_reported_not_fatal(db: Path, install: Callable[..., Settings]) -> None:
    install(**{"broker.url": f"redis://127.0.0.1:{free_port()}/0"})
    started = time.monotonic()
    _text, fam = scrape()
    assert time.monotonic() - started < 5
    assert samples(fam, "certqueue_broker_up") == {(): 0}
    assert samples(fam, "certqueue_queue_depth") == {}
    assert samples(fam, "certqueue_database_up") == {(): 1}


def test_filesystem_broker_counts_files(
    db: Path, install: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(db)  # the embedded broker lives under ./var/broker
    install(**{"broker.url": "filesystem://"})
    out = db / "var" / "broker" / "out"
    out.mkdir(parents=True)
    for name in ("1_a.acme.msg", "2_b.acme.msg", "3_c.dns.msg", "4_d.acme.tmp"):
        (out / name).write_text("{}")
    _text, fam = scrape()
    depth = samples(fam, "certqueue_queue_depth")
    assert (
        depth[(("pool", "acme"), ("queue", "acme"))] == 2 and depth[(("pool", "dns"), ("queue", "dns"))] == 1
    )
    assert depth[(("pool", "acme"), ("queue", "scan"))] == 0  # beat's scan queue is served by the acme pool
    ages = samples(fam, "certqueue_queue_oldest_message_age_seconds")
    assert (
        ages[(("pool", "acme"), ("queue", "acme"))] >= 0 and ages[(("pool", "acme"), ("queue", "scan"))] == 0
    )
    assert samples(fam, "certqueue_broker_up") == {(): 1}


def test_database_down_still_answers(db: Path, install: Callable[..., Settings]) -> None:
    install(**{"database.url": f"sqlite:///{db}"})  # a directory: cannot open
    _text, fam = scrape()
    assert samples(fam, "certqueue_database_up") == {(): 0}
    assert "certqueue_certificates" not in fam and "certqueue_broker_up" in fam


def test_render_metrics_uses_a_private_registry(db: Path) -> None:
    from prometheus_client import REGISTRY as GLOBAL

    cid = add(["render.example.com"], State.ACTIVE, 30)
    text = metrics.render_metrics().decode()
    assert f'certificate_id="{cid}"' in text
    assert "python_gc_objects_collected_total" not in text  # the global registry's default collectors
    assert metrics.COLLECTOR not in GLOBAL._collector_to_names


def test_private_keys_never_in_labels(db: Path) -> None:
    add(["secret.example.com"], State.ACTIVE, 30)
    text, _fam = scrape()
    assert "PRIVATE" not in text and "BEGIN" not in text


def test_serve_metrics_standalone(db: Path) -> None:
    import urllib.request

    cid = add(["standalone.example.com"], State.ACTIVE, 30)
    port = free_port()
    server = metrics.serve_metrics("127.0.0.1", port, block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert f'certificate_id="{cid}"' in body


def test_scrape_stays_fast_with_a_large_fleet(
    db: Path, install: Callable[..., Settings], tmp_path: Path
) -> None:
    """20k served certificates (bulk-inserted rows): the scrape is bounded queries, not row loads."""
    install(**{"monitoring.max_certificate_series": 100})
    n = 20_000
    with session_scope() as s:
        s.execute(
            Certificate.__table__.insert(),
            [
                {
                    "id": f"cert_bulk{i:011d}",
                    "domains": [f"h{i}.bulk.example.com"],
                    "dedupe_key": f"k{i}",
                    "state": "ACTIVE",
                    "directory_url": "",
                    "targets": [],
                    "challenge_map": {},
                    "key_type": "ec256",
                    "challenge_type": "http-01",
                    "auto_renew": True,
                    "reuse_key": False,
                    "external": False,
                    "attempts": 0,
                    "force_new_key": False,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for i in range(n)
            ],
        )
        s.execute(
            Issuance.__table__.insert(),
            [
                {
                    "id": i + 1,
                    "certificate_id": f"cert_bulk{i:011d}",
                    "serial": f"{i:x}",
                    "cert_pem": "",
                    "chain_pem": "",
                    "key_type": "ec256",
                    "fingerprint": f"{i:064x}",
                    "issuer": "",
                    "not_before": NOW - dt.timedelta(days=30),
                    "not_after": NOW + dt.timedelta(minutes=7 * i + 60),
                    "created_at": NOW,
                }
                for i in range(n)
            ],
        )
        s.execute(Certificate.__table__.update().values(current_issuance_id=None))
        s.execute(
            Certificate.__table__.update()
            .values(current_issuance_id=Issuance.__table__.c.id)
            .where(Issuance.__table__.c.certificate_id == Certificate.__table__.c.id)
        )
    started = time.perf_counter()
    _text, fam = scrape()
    elapsed = time.perf_counter() - started
    series = samples(fam, "certqueue_certificate_expiration_timestamp_seconds")
    assert len(series) == 100
    assert min(dict(k)["certificate_id"] for k in series) == "cert_bulk00000000000"
    assert samples(fam, "certqueue_certificate_expiry_seconds", "_count") == {(): n}
    assert elapsed < 5.0, f"scrape took {elapsed:.2f}s"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CERTQUEUE_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return promtool


def _lint(text: str) -> list[str]:
    res = subprocess.run(
        [_promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    problems = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == (3 if problems else 0), res.stdout + res.stderr  # 1 would be a parse error
    return problems


def _fill_every_family(settings: Settings) -> None:
    """A certificate, events, a queued message and one latency of each kind: no family empty."""
    add(["lint.example.com"], State.ACTIVE, 30)
    with session_scope() as s:
        events.record(s, None, "renewal", reason="success")
        events.record(s, None, "propagation", reason="success", data={"region": "eu-west"})
        events.record(s, None, "validation_error", reason="acme:x", data={"type": "dns-01"})
        events.record(s, None, "removal", reason="success", data={"region": "eu-west", "why": "revoke"})
        events.record(s, None, "drift", reason="drifted", data={"region": "eu-west"})
        events.record(s, None, "drift_error", reason="aws_acm:auth", data={"region": "eu-west", "count": 3})
    metrics.observe("certqueue_task_duration_seconds", ["certqueue.lint"], 0.02, settings)
    metrics.observe_acme_request("https://acme.example.test/dir", "https://acme.example.test/new-order", 0.03)
    metrics.flush(settings)


def test_promtool_check_metrics_is_clean(db: Path, install: Callable[..., Settings]) -> None:
    """Every family the exporter serves by default passes promtool's lint with no finding at all."""
    _fill_every_family(install())
    text, fam = scrape()
    assert _lint(text) == []
    # (deployments, rate budgets: empty families are lint-clean too; the rest must have samples)
    empty = {n for n, f in fam.items() if not f.samples}
    assert empty <= {
        "certqueue_deployments",
        "certqueue_region_pending_oldest_seconds",
        "certqueue_rate_limit_budget_remaining",
        "certqueue_broker_quarantined",
    }, empty  # fmt: skip  (quarantine: embedded only)
    # the guide's names (opt-in) are what the lint would object to: the check can fail
    install(**{"monitoring.guide_names": True})
    text, _fam = scrape()
    assert 'certificate_days_until_expiration use base unit "seconds" instead of "days"' in _lint(text)


def test_promtool_check_metrics_on_a_live_listener(db: Path, install: Callable[..., Settings]) -> None:
    """``certqueue metrics``' own listener, scraped over HTTP as Prometheus does, is lint-clean."""
    import urllib.request

    _fill_every_family(install())
    port = free_port()
    server = metrics.serve_metrics("127.0.0.1", port, block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "certqueue_build_info{" in body and "certqueue_acme_request_duration_seconds_bucket{" in body
    assert _lint(body) == []


def test_latencies_recorded_by_one_process_are_served_by_another(
    db: Path, install: Callable[..., Settings]
) -> None:
    """Workers record into Redis; the exporter (any process) reads the sum of every worker's."""
    settings = install()
    client = redis.Redis.from_url(process_redis_url())
    client.delete(
        "certqueue:metrics:certqueue_task_duration_seconds",
        "certqueue:metrics:certqueue_acme_request_duration_seconds",
    )
    code = (
        "from certqueue import metrics; from certqueue.config import configure;"
        f"configure({{'broker.url': {process_redis_url()!r}}});"
        "[metrics.observe('certqueue_task_duration_seconds', ['certqueue.t'], x) for x in (0.004, 0.2, 3.0)];"
        "metrics.observe_acme_request('https://ca.example.test/directory',"
        " 'https://ca.example.test/acme/authz/12', 0.07)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    metrics.observe("certqueue_task_duration_seconds", ["certqueue.t"], 0.2, settings)
    metrics.flush(settings)  # (the background thread would within FLUSH_SECONDS)
    _text, fam = scrape()
    buckets = {
        dict(k)["le"]: v for k, v in samples(fam, "certqueue_task_duration_seconds", "_bucket").items()
    }
    assert (buckets["0.005"], buckets["0.25"], buckets["2.5"], buckets["+Inf"]) == (1, 3, 3, 4)
    assert samples(fam, "certqueue_task_duration_seconds", "_sum")[
        (("task", "certqueue.t"),)
    ] == pytest.approx(3.404)
    acme = samples(fam, "certqueue_acme_request_duration_seconds", "_count")
    assert acme == {(("ca", "ca.example.test"), ("endpoint", "authorization")): 1}


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("https://acme-v02.api.letsencrypt.org/acme/new-order", "newOrder"),
        ("https://acme-v02.api.letsencrypt.org/acme/new-nonce", "newNonce"),
        ("https://acme-v02.api.letsencrypt.org/acme/authz/123/456", "authorization"),
        ("https://acme-v02.api.letsencrypt.org/acme/chall/123/456/abc", "challenge"),
        ("https://acme-v02.api.letsencrypt.org/acme/finalize/1/2", "finalize"),
        ("https://acme-v02.api.letsencrypt.org/acme/cert/fa12", "certificate"),
        ("https://acme-v02.api.letsencrypt.org/acme/order/1/2", "order"),
        ("https://acme-v02.api.letsencrypt.org/directory", "directory"),
        ("https://127.0.0.1:14000/order-plz", "newOrder"),
        ("https://127.0.0.1:14000/my-order/x", "order"),
        ("https://127.0.0.1:14000/authZ/x", "authorization"),
        ("https://127.0.0.1:14000/chalZ/x", "challenge"),
        ("https://127.0.0.1:14000/finalize-order/x", "finalize"),
        ("https://127.0.0.1:14000/certZ/x", "certificate"),
        ("https://127.0.0.1:14000/sign-me-up", "newAccount"),
        ("https://127.0.0.1:14000/my-account/1", "account"),
    ],
)
def test_acme_endpoint_names_never_carry_ids(url: str, endpoint: str) -> None:
    assert metrics.acme_endpoint(url) == endpoint


def test_oldest_message_age_from_the_sent_at_header(db: Path, install: Callable[..., Settings]) -> None:
    """A message published through Celery carries its send time; the exporter reports its age."""
    import json

    settings = install(
        **{"multi_region.regions": [{"name": "age-test-1", "provider": "local", "path": "/tmp/x"}]}
    )
    client = redis.Redis.from_url(process_redis_url())
    queue = "propagate.age-test-1"
    client.delete(queue)
    client.lpush(queue, json.dumps({"headers": {metrics.SENT_AT_HEADER: time.time() - 120}}))
    client.lpush(queue, json.dumps({"headers": {metrics.SENT_AT_HEADER: time.time() - 5}}))
    try:
        _text, fam = scrape()
    finally:
        client.delete(queue)
    key = (("pool", "propagate"), ("queue", queue))
    assert samples(fam, "certqueue_queue_depth")[key] == 2
    assert 119 < samples(fam, "certqueue_queue_oldest_message_age_seconds")[key] < 200
    del settings
    # and Celery's publish path really stamps the header (the signal receiver of stamp_sent_at)
    from celery import Celery

    from certqueue.celery_app import stamp_sent_at

    stamp_sent_at()
    app = Celery("age", broker=process_redis_url(), set_as_current=False)
    app.send_task("certqueue.nothing", queue=queue)
    try:
        (raw,) = client.lrange(queue, 0, -1)
        assert time.time() - json.loads(raw)["headers"][metrics.SENT_AT_HEADER] < 60
    finally:
        client.delete(queue)


def test_renewal_overdue_counts_active_certificates_past_renew_at(
    db: Path, install: Callable[..., Settings]
) -> None:
    late = add(["late.example.com"], State.ACTIVE, 20)
    fresh = add(["fresh.example.com"], State.ACTIVE, 60)
    busy = add(["busy.example.com"], State.RENEWING, 10)
    with session_scope() as s:
        for cid, renew_at in ((late, NOW - dt.timedelta(hours=3)), (fresh, NOW + dt.timedelta(days=30)),
                              (busy, NOW - dt.timedelta(hours=3))):  # fmt: skip
            s.get(Certificate, cid).renew_at = renew_at  # type: ignore[union-attr]
    _text, fam = scrape()
    assert samples(fam, "certqueue_certificates_renewal_overdue") == {(): 1}
    install(**{"monitoring.renewal_overdue_grace_minutes": 240})
    _text, fam = scrape()
    assert samples(fam, "certqueue_certificates_renewal_overdue") == {(): 0}


def test_deferred_certificates_counted_by_kind_of_reason(db: Path) -> None:
    """certqueue_certificates_deferred: only work still waiting (a resume time ahead) in a working
    state counts; the label is the kind of reason, never its text (which names domains)."""
    waits = [
        (State.ISSUING, "rate limit: certificates per domain a.example.com", 60),
        (State.RENEWING, "rate limit: new orders per account", 60),
        (State.ISSUING, "rate limit: the CA answered rateLimited", 60),
        (State.REQUESTED, "capacity: open orders at this CA at the cap", 5),
        (State.ISSUING, "rate limit: certificates per domain b.example.com", -5),  # resumed already
        (State.ACTIVE, "rate limit: certificates per domain c.example.com", 60),  # not waiting
    ]
    for i, (state, reason, seconds) in enumerate(waits):
        cid = add([f"w{i}.example.com"], state)
        with session_scope() as s:
            cert = s.get_one(Certificate, cid)
            cert.waiting_reason = reason
            cert.next_attempt_at = NOW + dt.timedelta(seconds=seconds)
    _text, fams = scrape()
    got = samples(fams, "certqueue_certificates_deferred")
    assert got == {
        (("reason", "rate_limited"),): 2.0,
        (("reason", "ca_rate_limited"),): 1.0,
        (("reason", "capacity"),): 1.0,
        (("reason", "other"),): 0.0,
    }
