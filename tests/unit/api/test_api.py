"""The REST API over real HTTP: uvicorn on a free loopback port, a temporary SQLite database, and the
real Redis broker (db 15) to see what was enqueued. Covers auth (401/403), validation (422 naming the
field, nothing written), 404/409, pagination, duplicates, revocation reasons, health states, jobs,
and a bounded schemathesis fuzz (no 5xx)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import delete, func, select

from certqueue import certificates, migrate, tokens
from certqueue.api.app import create_app
from certqueue.celery_app import lazy_app
from certqueue.config import Settings, load_settings, set_settings
from certqueue.db import dispose_all, session_scope
from certqueue.intents import OPEN
from certqueue.keystore import generate_key_file
from certqueue.models import (
    ApiToken,
    Base,
    Certificate,
    Deployment,
    Event,
    Intent,
    Issuance,
    State,
    utcnow,
)
from devstack.ports import free_port
from tests.conftest import skip_unless_required
from tests.conftest_db import BACKENDS, create_pg_database, drop_pg_database, pg_sqlalchemy_url
from tests.conftest_redis import process_redis_url

# --- throwaway certificates --------------------------------------------------------------------------

_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certqueue api test CA")])
_CA_SKI = x509.SubjectKeyIdentifier.from_public_key(_CA_KEY.public_key())
_CA = (
    x509.CertificateBuilder()
    .subject_name(_CA_NAME)
    .issuer_name(_CA_NAME)
    .public_key(_CA_KEY.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    .add_extension(_CA_SKI, critical=False)
    .sign(_CA_KEY, hashes.SHA256())
)
CA_PEM = _CA.public_bytes(serialization.Encoding.PEM).decode()


def make_leaf(domains: list[str], days_left: float, lifetime_days: float = 90) -> tuple[str, str]:
    """(leaf PEM, private key PEM) signed by the test CA, expiring ``days_left`` days from now."""
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = utcnow() + dt.timedelta(days=days_left)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]))
        .issuer_name(_CA_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=lifetime_days))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_CA_SKI), critical=False
        )
        .sign(_CA_KEY, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return leaf.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def add_certificate(
    domains: list[str],
    *,
    state: State = State.REQUESTED,
    days_left: float | None = None,
    external: bool = False,
) -> str:
    """Insert a certificate directly (optionally with a served issuance); returns its id."""
    with session_scope() as s:
        cert, created = certificates.create_certificate(
            s, certificates.CertificateRequest.build(domains=domains)
        )
        assert created
        if days_left is not None:
            leaf, key = make_leaf(domains, days_left)
            iss = certificates.store_issuance(s, cert, leaf + CA_PEM, key.encode())
            cert.current_issuance_id = iss.id
        cert.state = state
        cert.external = external
        return cert.id


# --- the server --------------------------------------------------------------------------------------


class Api:
    def __init__(self, base: str, settings: Settings, tokens_: dict[str, str], tmp: Path, url: str) -> None:
        self.db_url = url
        self.base = base
        self.settings = settings
        self.tokens = tokens_
        self.tmp = tmp
        self.http = httpx.Client(base_url=base, timeout=15)
        self.redis = redis.Redis.from_url(process_redis_url(), socket_timeout=5, socket_connect_timeout=5)

    def call(self, method: str, path: str, *, as_: str | None = "admin", **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if as_ is not None:
            headers["Authorization"] = f"Bearer {self.tokens[as_]}"
        return self.http.request(method, path, headers=headers, **kw)

    def take_message(self, job_id: str) -> tuple[str, dict[str, Any]]:
        """The request behind ``job_id`` (an open intent in the database), closed so the test sees
        it once: (the public task it stands for, that task's payload)."""
        assert job_id.startswith("intent-"), job_id
        with session_scope() as s:
            intent = s.get(Intent, int(job_id.removeprefix("intent-")))
            assert intent is not None and intent.status in ("pending", "dispatched"), job_id
            intent.status = "done"
            payload: dict[str, Any] = {
                "v": 1,
                "certificate_id": intent.certificate_id,
                **(intent.params or {}),
            }
            return f"certqueue.{intent.kind}", payload

    def queued(self) -> int:
        """Open intents: requests waiting for dispatch."""
        with session_scope(write=False) as s:
            return int(
                s.execute(
                    select(func.count()).select_from(Intent).where(Intent.status.in_(OPEN))
                ).scalar_one()
            )

    def queued_ids(self) -> set[str]:
        with session_scope(write=False) as s:
            return set(s.execute(select(Intent.certificate_id).where(Intent.status.in_(OPEN))).scalars())

    def drop_nudges(self) -> None:
        """The dispatch nudges our requests sent (nothing consumes this test's broker)."""
        for raw in self.redis.lrange("scan", 0, -1):
            if json.loads(raw)["headers"]["task"] == "certqueue.scan.dispatch":
                self.redis.lrem("scan", 1, raw)


def counts() -> dict[str, int]:
    with session_scope(write=False) as s:
        return {
            t.name: s.execute(select(func.count()).select_from(t)).scalar_one()
            for t in Base.metadata.sorted_tables
        }


def settings_for(tmp: Path, url: str, **extra: Any) -> Settings:
    overrides = {
        "database.url": url,
        "storage.encryption_key_path": str(tmp / "master.key"),
        "broker.url": process_redis_url(),  # a database claimed for this test process
        "multi_region.regions": [{"name": "eu-west", "provider": "local", "directory": str(tmp / "deploy")}],
        **extra,
    }
    return load_settings(overrides=overrides, directory=tmp, environ={}).settings


@pytest.fixture(scope="module", params=BACKENDS)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The whole API on SQLite and on the real PostgreSQL (skipped if absent, unless
    CERTQUEUE_REQUIRE_POSTGRES is set)."""
    tmp = tmp_path_factory.mktemp("api")
    generate_key_file(tmp / "master.key")
    pg_name = create_pg_database() if request.param == "postgres" else None
    url = pg_sqlalchemy_url(pg_name) if pg_name else f"sqlite:///{tmp / 'api.db'}"
    settings = settings_for(tmp, url)
    set_settings(settings)
    lazy_app.reset()
    certificates.forget_keystores()
    migrate.upgrade()
    made = {}
    with session_scope() as s:
        for scope, name in (("read", "reader"), ("write", "writer"), ("admin", "admin")):
            _id, made[scope] = tokens.create_token(s, name, [scope])
        revoked_id, made["revoked"] = tokens.create_token(s, "old", ["admin"])
        tokens.revoke_token(s, revoked_id)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    client = Api(f"http://127.0.0.1:{port}", settings, made, tmp, url)
    client.redis.ping()  # the broker must be there: this is not a test that may silently skip
    try:
        yield client
    finally:
        client.drop_nudges()
        server.should_exit = True
        thread.join(10)
        client.http.close()
        dispose_all()
        lazy_app.reset()
        certificates.forget_keystores()
        if pg_name:
            drop_pg_database(pg_name)
        set_settings(None)


@pytest.fixture()
def fresh(api: Api) -> Api:
    """Empty every table but the tokens before a test; drop the nudges earlier tests sent."""
    api.drop_nudges()
    with session_scope() as s:
        s.execute(Certificate.__table__.update().values(current_issuance_id=None, pending_issuance_id=None))
        for table in reversed(Base.metadata.sorted_tables):
            if table.name != ApiToken.__tablename__:
                s.execute(delete(table))
    return api


# --- documentation, authentication, scopes ----------------------------------------------------------


def test_openapi_and_docs_are_published(api: Api) -> None:
    spec = api.call("GET", "/openapi.json", as_=None).json()
    assert {
        "/v1/certificates",
        "/v1/certificates/{certificate_id}",
        "/v1/certificates/{certificate_id}/revoke",
        "/v1/certificates/import",
        "/v1/jobs/{job_id}",
        "/health",
        "/health/certificates",
    } <= set(spec["paths"])
    assert "/metrics" not in spec["paths"]  # served by `certqueue metrics` on its own port
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    docs = api.call("GET", "/docs", as_=None)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/certificates"),
        ("POST", "/v1/certificates"),
        ("GET", "/v1/certificates/cert_aaaaaaaaaaaaaaaa"),
        ("DELETE", "/v1/certificates/cert_aaaaaaaaaaaaaaaa"),
        ("GET", "/v1/jobs/abc"),
    ],
)
def test_no_token_is_401_with_challenge(api: Api, method: str, path: str) -> None:
    r = api.call(method, path, as_=None, json={"domains": ["a.example.com"]} if method == "POST" else None)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Bearer cqt_wrong", "Bearer", "Basic dXNlcjpwYXNz", "cqt_x"])
def test_bad_or_revoked_token_is_401(api: Api, header: str) -> None:
    r = api.call("GET", "/v1/certificates", as_=None, headers={"Authorization": header})
    assert r.status_code == 401
    r = api.call("GET", "/v1/certificates", as_="revoked")
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert api.tokens["revoked"] not in r.text


def test_wrong_scope_is_403_and_writes_nothing(fresh: Api) -> None:
    before = counts()
    r = fresh.call("POST", "/v1/certificates", as_="read", json={"domains": ["scope.example.com"]})
    assert r.status_code == 403 and "write" in r.json()["detail"]
    assert fresh.call("GET", "/v1/certificates", as_="read").status_code == 200
    assert counts() == before


# --- create --------------------------------------------------------------------------------------------


def test_create_commits_then_enqueues_issue(fresh: Api) -> None:
    r = fresh.call(
        "POST",
        "/v1/certificates",
        as_="write",
        json={
            "domains": ["www.create.example.com", "create.example.com"],
            "email": "ops@example.com",
            "organization": "Example Corp",
            "country": "us",
            "key_type": "ec384",
        },
    )
    assert r.status_code == 202, r.text
    body = r.json()
    cert = body["certificate"]
    assert body["created"] is True and body["job_id"]
    assert cert["state"] == "REQUESTED" and cert["domains"] == [
        "www.create.example.com",
        "create.example.com",
    ]
    assert cert["subject"]["country"] == "US" and cert["key_type"] == "ec384"
    task, payload = fresh.take_message(body["job_id"])
    assert task == "certqueue.issue"
    assert payload == {"v": 1, "certificate_id": cert["id"]}
    with session_scope(write=False) as s:
        row = s.get(Certificate, cert["id"])
        assert row is not None and row.state == State.REQUESTED
        ev = s.execute(select(Event).where(Event.certificate_id == cert["id"])).scalars().one()
        assert ev.kind == "requested" and ev.actor == "api:writer"


def test_duplicate_request_returns_the_existing_certificate(fresh: Api) -> None:
    first = fresh.call(
        "POST", "/v1/certificates", json={"domains": ["a.dup.example.com", "b.dup.example.com"]}
    )
    assert first.status_code == 202
    fresh.take_message(first.json()["job_id"])
    before = counts()
    again = fresh.call(
        "POST", "/v1/certificates", json={"domains": ["B.dup.example.com.", "a.dup.example.com"]}
    )
    assert again.status_code == 200, again.text
    assert again.json()["certificate"]["id"] == first.json()["certificate"]["id"]
    assert again.json()["created"] is False and again.json()["job_id"] is None
    assert counts() == before
    assert first.json()["certificate"]["id"] not in fresh.queued_ids()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"domains": ["not a domain"]}, "domains"),
        ({"domains": ["192.0.2.1"]}, "domains"),
        ({"domains": []}, "domains"),
        ({"domains": ["*.wild.example.com"]}, "challenge_type"),
        ({"domains": ["x.example.com"], "challenge_type": "dns-01"}, "dns_provider"),
        ({"domains": ["x.example.com"], "targets": ["nowhere"]}, "targets"),
        ({"domains": ["x.example.com"], "key_size": 1234}, "key_size"),
        ({"domains": ["x.example.com"], "key_type": "dsa"}, "key_type"),
        ({"domains": ["x.example.com"], "email": "not-an-email"}, "email"),
        ({"domains": ["x.example.com"], "country": "USA"}, "country"),
        ({"domains": ["x.example.com"], "colour": "blue"}, "colour"),
        ({"domains": "x.example.com"}, "domains"),
    ],
)
def test_bad_input_is_422_naming_the_field_and_writes_nothing(
    fresh: Api, body: dict[str, Any], field: str
) -> None:
    before, queued = counts(), fresh.queued()
    r = fresh.call("POST", "/v1/certificates", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][0] == "body" and field in d["loc"] for d in detail), detail
    assert all(d["msg"] for d in detail)
    assert counts() == before
    assert fresh.queued() == queued


def test_create_with_broker_down_commits_the_request_and_answers_at_once(fresh: Api) -> None:
    # results in SQLite: with a dead Redis *result backend* Celery's own reconnect loop (20 x 1 s) would
    # hold the request; that retry policy belongs to celery_app's configuration
    dead = f"redis://127.0.0.1:{free_port()}/0"
    set_settings(
        settings_for(
            fresh.tmp,
            fresh.db_url,
            **{"broker.url": dead, "broker.result_backend": f"db+sqlite:///{fresh.tmp / 'res.db'}"},
        )
    )
    lazy_app.reset()
    try:
        r = fresh.call("POST", "/v1/certificates", json={"domains": ["down.example.com"]})
    finally:
        set_settings(fresh.settings)
        lazy_app.reset()
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    with session_scope(write=False) as s:  # committed with its intent: dispatch relays it later
        assert s.get(Certificate, r.json()["certificate"]["id"]) is not None
        intent = s.get(Intent, int(job.removeprefix("intent-")))
        assert intent is not None and intent.status == "pending" and intent.kind == "issue"


def test_bulk_create_writes_the_good_items_and_names_the_bad(fresh: Api) -> None:
    items: list[Any] = [{"domains": [f"b{i}.bulk.example.com"]} for i in range(5)]
    items[1] = {"domains": "b1.bulk.example.com"}  # not a list
    items[3] = {"domains": ["*.b3.bulk.example.com"]}  # a wildcard needs dns-01
    items.append({"domains": ["b0.bulk.example.com"]})  # the same names as item 0: one certificate
    assert (
        fresh.call("POST", "/v1/certificates/bulk", as_="read", json={"certificates": items}).status_code
        == 403
    )
    before = counts()
    r = fresh.call("POST", "/v1/certificates/bulk", as_="write", json={"certificates": items})
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["created"], body["existing"], body["rejected"]) == (3, 1, 2)
    assert [it["index"] for it in body["items"]] == list(range(6))
    assert (
        body["items"][1]["error"]["field"] == "domains"
        and body["items"][3]["error"]["field"] == "challenge_type"
    )
    assert body["items"][5]["certificate"]["id"] == body["items"][0]["certificate"]["id"]
    assert counts()["certificates"] == before["certificates"] + 3 and fresh.queued() == 3
    too_many = {"certificates": [{"domains": [f"x{i}.example.com"]} for i in range(1001)]}
    assert fresh.call("POST", "/v1/certificates/bulk", json=too_many).status_code == 422
    assert counts()["certificates"] == before["certificates"] + 3


# --- read ----------------------------------------------------------------------------------------------


def test_get_shows_issuance_metadata_and_deployments_never_the_key(fresh: Api) -> None:
    cid = add_certificate(["show.example.com", "www.show.example.com"], state=State.ACTIVE, days_left=40)
    with session_scope() as s:
        iss_id = s.get_one(Certificate, cid).current_issuance_id
        s.add(
            Deployment(
                certificate_id=cid,
                region="eu-west",
                provider="local",
                status="deployed",
                remote_ref="/srv/tls/show",
                issuance_id=iss_id,
                fingerprint="ab" * 32,
                deployed_at=utcnow(),
            )
        )
    r = fresh.call("GET", f"/v1/certificates/{cid}", as_="read")
    assert r.status_code == 200
    body = r.json()
    iss = body["current_issuance"]
    assert iss["id"] == iss_id and 39.9 < iss["days_until_expiration"] <= 40
    assert iss["issuer"] and len(iss["fingerprint_sha256"]) == 64
    assert body["deployments"] == [
        {**body["deployments"][0], "region": "eu-west", "status": "deployed", "remote_ref": "/srv/tls/show"}
    ]
    assert "PRIVATE KEY" not in r.text and "key_enc" not in r.text


def test_unknown_is_404_and_malformed_id_is_422(api: Api) -> None:
    r = api.call("GET", "/v1/certificates/cert_zzzzzzzzzzzzzzzzzzzz")
    assert r.status_code == 404
    r = api.call("GET", "/v1/certificates/nope")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["path", "certificate_id"]


def test_list_pagination_and_filters(fresh: Api) -> None:
    ids = [
        add_certificate(
            [f"p{i}.page.example.com", f"www.p{i}.page.example.com"],
            state=State.ACTIVE if i % 2 else State.REQUESTED,
        )
        for i in range(7)
    ]
    r = fresh.call("GET", "/v1/certificates", as_="read", params={"limit": 3})
    page = r.json()
    assert page["total"] == 7 and [c["id"] for c in page["items"]] == ids[:3] and page["next_cursor"]
    first_cursor = page["next_cursor"]
    seen, cursor = [], None
    for _ in range(5):
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = fresh.call("GET", "/v1/certificates", as_="read", params=params).json()
        seen += [c["id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids
    by_offset = fresh.call("GET", "/v1/certificates", as_="read", params={"limit": 3, "offset": 3}).json()
    assert [c["id"] for c in by_offset["items"]] == ids[3:6]
    active = fresh.call("GET", "/v1/certificates", as_="read", params={"state": "ACTIVE"}).json()
    assert active["total"] == 3 and {c["id"] for c in active["items"]} == {ids[1], ids[3], ids[5]}
    both = fresh.call(
        "GET", "/v1/certificates", as_="read", params=[("state", "ACTIVE"), ("state", "REQUESTED")]
    )
    assert both.json()["total"] == 7
    one = fresh.call(
        "GET", "/v1/certificates", as_="read", params={"domain": "WWW.p4.page.example.com."}
    ).json()
    assert one["total"] == 1 and one["items"][0]["id"] == ids[4]
    assert (
        fresh.call("GET", "/v1/certificates", as_="read", params={"domain": "p4.page"}).json()["total"] == 0
    )
    for params, field in (
        ({"limit": 501}, "limit"),
        ({"limit": 0}, "limit"),
        ({"offset": -1}, "offset"),
        ({"state": "BOGUS"}, "state"),
        ({"domain": "bad domain"}, "domain"),
        ({"cursor": "garbage"}, "cursor"),
        ({"cursor": first_cursor, "offset": 1}, "offset"),
    ):
        r = fresh.call("GET", "/v1/certificates", as_="read", params=params)
        assert r.status_code == 422, (params, r.text)
        assert ["query", field] == r.json()["detail"][0]["loc"][:2], (params, r.json())


# --- actions -------------------------------------------------------------------------------------------


def test_renew_enqueues_and_refuses_what_cannot_renew(fresh: Api) -> None:
    cid = add_certificate(["renew.example.com"], state=State.ACTIVE, days_left=50)
    r = fresh.call("POST", f"/v1/certificates/{cid}/renew", as_="write", json={"force": True})
    assert r.status_code == 202, r.text
    assert fresh.take_message(r.json()["job_id"]) == (
        "certqueue.renew",
        {"v": 1, "certificate_id": cid, "force": True},
    )
    r = fresh.call("POST", f"/v1/certificates/{cid}/renew", as_="write")
    assert r.status_code == 200 and r.json()["job_id"] is None  # not due, not forced: nothing to do
    revoked = add_certificate(["gone.renew.example.com"], state=State.REVOKED, days_left=50)
    assert fresh.call("POST", f"/v1/certificates/{revoked}/renew").status_code == 409
    imported = add_certificate(["ext.renew.example.com"], state=State.ACTIVE, days_left=50, external=True)
    r = fresh.call("POST", f"/v1/certificates/{imported}/renew")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "certificate_id"]
    assert fresh.call("POST", "/v1/certificates/cert_zzzzzzzzzzzzzzzzzzzz/renew").status_code == 404
    assert fresh.call("POST", f"/v1/certificates/{cid}/renew", json={"force": "maybe"}).status_code == 422
    assert fresh.queued_ids().isdisjoint({cid, revoked, imported})


@pytest.mark.parametrize("reason", ["affiliationChanged", "bogus", "privilegeWithdrawn"])
def test_revoke_reason_is_refused_before_enqueueing(fresh: Api, reason: str) -> None:
    cid = add_certificate(["revoke.example.com"], state=State.ACTIVE, days_left=50)
    before, queued = counts(), fresh.queued()
    r = fresh.call("POST", f"/v1/certificates/{cid}/revoke", as_="write", json={"reason": reason})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "reason"]
    assert counts() == before and fresh.queued() == queued


def test_revoke_enqueues_an_accepted_reason(fresh: Api) -> None:
    cid = add_certificate(["ok.revoke.example.com"], state=State.ACTIVE, days_left=50)
    r = fresh.call("POST", f"/v1/certificates/{cid}/revoke", as_="write", json={"reason": "keyCompromise"})
    assert r.status_code == 202
    assert fresh.take_message(r.json()["job_id"]) == (
        "certqueue.revoke",
        {"v": 1, "certificate_id": cid, "reason": "keyCompromise"},
    )
    done = add_certificate(["done.revoke.example.com"], state=State.REVOKED, days_left=50)
    r = fresh.call("POST", f"/v1/certificates/{done}/revoke")
    assert r.status_code == 200 and r.json()["job_id"] is None
    pending = add_certificate(["pending.revoke.example.com"])
    assert fresh.call("POST", f"/v1/certificates/{pending}/revoke").status_code == 409


def test_propagate(fresh: Api) -> None:
    cid = add_certificate(["prop.example.com"], state=State.ACTIVE, days_left=50)
    r = fresh.call("POST", f"/v1/certificates/{cid}/propagate", as_="write", json={"regions": ["eu-west"]})
    assert r.status_code == 202
    assert fresh.take_message(r.json()["job_id"]) == (
        "certqueue.propagate",
        {"v": 1, "certificate_id": cid, "regions": ["eu-west"]},
    )
    # no subset and no regions of its own (multi_region is off): nothing to deploy, nothing written
    r = fresh.call("POST", f"/v1/certificates/{cid}/propagate")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "regions"], r.text
    r = fresh.call("POST", f"/v1/certificates/{cid}/propagate", json={"regions": ["mars-1"]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "regions"]
    nothing = add_certificate(["none.prop.example.com"])
    assert fresh.call("POST", f"/v1/certificates/{nothing}/propagate").status_code == 409


def test_delete_rules(fresh: Api) -> None:
    active = add_certificate(["del.example.com"], state=State.ACTIVE, days_left=50)
    failed = add_certificate(["failed.del.example.com"], state=State.FAILED)
    before = counts()
    assert fresh.call("DELETE", f"/v1/certificates/{active}", as_="write").status_code == 409
    assert (
        fresh.call("DELETE", f"/v1/certificates/{active}", as_="write", params={"force": "true"}).status_code
        == 403
    )
    assert fresh.call("DELETE", f"/v1/certificates/{failed}", as_="read").status_code == 403
    assert counts() == before
    assert fresh.call("DELETE", f"/v1/certificates/{failed}", as_="write").status_code == 204
    r = fresh.call("DELETE", f"/v1/certificates/{active}", as_="admin", params={"force": "true"})
    assert r.status_code == 204, r.text
    with session_scope(write=False) as s:
        assert s.execute(select(func.count()).select_from(Certificate)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(Issuance)).scalar_one() == 0
        kinds = s.execute(select(Event.certificate_id, Event.reason).where(Event.kind == "deleted")).all()
        assert sorted(kinds) == sorted([(failed, None), (active, "forced")])
    assert fresh.call("DELETE", f"/v1/certificates/{active}").status_code == 404


def test_import(fresh: Api) -> None:
    leaf, key = make_leaf(["imported.example.com"], days_left=200)
    _other_leaf, other_key = make_leaf(["imported.example.com"], days_left=200)
    before = counts()
    for body, field in (
        ({"certificate_pem": "junk", "private_key_pem": key}, "certificate_pem"),
        ({"certificate_pem": leaf, "private_key_pem": other_key}, "private_key_pem"),
        ({"certificate_pem": leaf, "private_key_pem": "junk"}, "private_key_pem"),
        ({"certificate_pem": leaf, "private_key_pem": key, "targets": ["x"]}, "targets"),
    ):
        r = fresh.call("POST", "/v1/certificates/import", as_="write", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", field]
        assert key not in r.text and other_key not in r.text
    assert (
        fresh.call(
            "POST",
            "/v1/certificates/import",
            as_="read",
            json={"certificate_pem": leaf, "private_key_pem": key},
        ).status_code
        == 403
    )
    assert counts() == before
    r = fresh.call(
        "POST",
        "/v1/certificates/import",
        as_="write",
        json={"certificate_pem": leaf, "private_key_pem": key, "chain_pem": CA_PEM},
    )
    assert r.status_code == 201, r.text
    cert = r.json()["certificate"]
    assert cert["state"] == "ACTIVE" and cert["external"] is True and r.json()["job_id"] is None
    assert cert["current_issuance"]["days_until_expiration"] > 199
    r = fresh.call(
        "POST", "/v1/certificates/import", as_="write", json={"certificate_pem": leaf, "private_key_pem": key}
    )
    assert r.status_code == 422  # the same certificate twice
    r = fresh.call(
        "POST",
        "/v1/certificates/import",
        as_="write",
        json={
            "certificate_pem": make_leaf(["p.imported.example.com"], 100)[0],
            "private_key_pem": make_leaf(["p.imported.example.com"], 100)[1],
        },
    )
    assert r.status_code == 422  # key does not match (two different keys)
    leaf2, key2 = make_leaf(["regional.imported.example.com"], days_left=100)
    r = fresh.call(
        "POST",
        "/v1/certificates/import",
        json={"certificate_pem": leaf2, "private_key_pem": key2, "targets": ["eu-west"]},
    )
    assert r.status_code == 201 and r.json()["certificate"]["state"] == "ISSUED"
    assert fresh.take_message(r.json()["job_id"]) == (
        "certqueue.propagate",
        {"v": 1, "certificate_id": r.json()["certificate"]["id"]},
    )


# --- jobs ----------------------------------------------------------------------------------------------


def test_jobs(fresh: Api) -> None:
    r = fresh.call("POST", "/v1/certificates", json={"domains": ["job.example.com"]})
    job = r.json()["job_id"]
    st = fresh.call("GET", f"/v1/jobs/{job}", as_="read").json()
    assert st == {
        "job_id": job,
        "state": "PENDING",
        "ready": False,
        "successful": None,
        "result": None,
        "error": None,
    }
    # the request's outcome is read from the database: a revocation the CA refused for good
    with session_scope() as s:
        intent = s.get(Intent, int(job.removeprefix("intent-")))
        assert intent is not None
        intent.status, intent.outcome = "failed", "acme:unauthorized"
    st = fresh.call("GET", f"/v1/jobs/{job}", as_="read").json()
    assert st["state"] == "FAILURE" and st["ready"] is True and st["successful"] is False
    assert st["error"] == "acme:unauthorized" and st["result"]["kind"] == "issue"
    assert fresh.call("GET", "/v1/jobs/intent-999999", as_="read").status_code == 404
    backend = lazy_app.get().backend
    try:
        backend.store_result("cq-test-ok-" + job, {"certificate_id": "cert_x", "status": "noop"}, "SUCCESS")
        st = fresh.call("GET", f"/v1/jobs/cq-test-ok-{job}", as_="read").json()
        assert st["state"] == "SUCCESS" and st["successful"] is True and st["result"]["status"] == "noop"
        from certqueue.errors import PermanentError

        failure = PermanentError("rejected", reason="acme:rejectedIdentifier")
        backend.mark_as_failure("cq-test-ko-" + job, failure)
        st = fresh.call("GET", f"/v1/jobs/cq-test-ko-{job}", as_="read").json()
        assert st["state"] == "FAILURE" and st["successful"] is False
        assert st["error"] == "PermanentError: rejected"
    finally:
        fresh.redis.delete(f"celery-task-meta-cq-test-ok-{job}", f"celery-task-meta-cq-test-ko-{job}")
    assert fresh.call("GET", "/v1/jobs/bad id!", as_="read").status_code == 422
    assert fresh.call("GET", f"/v1/jobs/{job}", as_=None).status_code == 401


# --- health and metrics ---------------------------------------------------------------------------------


def test_health_reports_database(api: Api) -> None:
    r = api.call("GET", "/health", as_=None)
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "ok"}
    # a database URL that cannot be opened (a directory): 503
    set_settings(settings_for(api.tmp, f"sqlite:///{api.tmp}"))
    try:
        r = api.call("GET", "/health", as_=None)
    finally:
        set_settings(api.settings)
    assert r.status_code == 503 and r.json()["database"] == "unreachable"


def test_certificate_health_states(fresh: Api) -> None:
    def health() -> dict[str, Any]:
        r = fresh.call("GET", "/health/certificates", as_=None)
        assert r.status_code == 200
        return r.json()

    assert health() == {
        "status": "healthy",
        "total": 0,
        "expiring_soon": 0,
        "expired": 0,
        "threshold_days": 14,
    }
    add_certificate(["fine.health.example.com"], state=State.ACTIVE, days_left=60)
    add_certificate(["requested.health.example.com"])
    add_certificate(["old.health.example.com"], state=State.REVOKED, days_left=-3)  # not in service
    assert health() == {
        "status": "healthy",
        "total": 3,
        "expiring_soon": 0,
        "expired": 0,
        "threshold_days": 14,
    }
    add_certificate(["soon.health.example.com"], state=State.RENEWING, days_left=5)
    h = health()
    assert (h["status"], h["expiring_soon"], h["expired"], h["total"]) == ("degraded", 1, 0, 4)
    add_certificate(["expired.health.example.com"], state=State.ACTIVE, days_left=-1)
    h = health()
    assert (h["status"], h["expiring_soon"], h["expired"], h["total"]) == ("unhealthy", 1, 1, 5)
    add_certificate(["scanned.health.example.com"], state=State.EXPIRED, days_left=-2)
    assert health()["expired"] == 2


def test_metrics_are_not_served_on_the_api_port(fresh: Api) -> None:
    """/metrics has its own listener (`certqueue metrics`, monitoring.prometheus_port), reachable only
    from the monitoring network; the API port, often public, does not serve it."""
    add_certificate(["metrics.example.com"], state=State.ACTIVE, days_left=10)
    r = fresh.call("GET", "/metrics", as_=None)
    assert r.status_code == 404 and "metrics.example.com" not in r.text


# --- fuzzing ---------------------------------------------------------------------------------------------


def test_fuzz_no_server_errors(fresh: Api) -> None:
    """Schemathesis drives every operation of the published schema (bounded: 30 examples each) with an
    admin token; no answer may be a 5xx. (Driven through hypothesis directly: schemathesis' pytest
    plugin does not load under pytest 9.)"""
    try:
        import schemathesis
    except ImportError:
        skip_unless_required("schemathesis not installed (it is in the dev extra: make install)")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error

    real_id = add_certificate(["fuzz.example.com"], state=State.ACTIVE, days_left=30)
    schema = schemathesis.openapi.from_url(f"{fresh.base}/openapi.json")
    headers = {"Authorization": f"Bearer {fresh.tokens['admin']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: dict[str, set[int]] = {}

    def realistic(case: Any, use_real: bool, n: int) -> Any:
        # half the cases aim at an existing certificate / valid names, so the fuzz gets past validation
        if use_real and "certificate_id" in (case.path_parameters or {}):
            case.path_parameters["certificate_id"] = real_id
        if (
            use_real
            and case.method == "POST"
            and case.path == "/v1/certificates"
            and isinstance(case.body, dict)
        ):
            # the names alone: with the other fuzzed fields kept, every one of the ~15 such cases
            # could still fail validation (a random key type or email) and the check below flaked
            case.body = {"domains": [f"f{n}.fuzz.example.com"]}
        return case

    for operation in operations:

        @given(case=operation.as_strategy(), use_real=st.booleans(), n=st.integers(0, 10_000))
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case: Any, use_real: bool, n: int) -> None:
            case = realistic(case, use_real, n)
            response = case.call(base_url=fresh.base, headers=headers, timeout=15)
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.formatted_path, response.text)
            case.validate_response(response, checks=[not_a_server_error])

        fuzz()
    # the fuzz reached past validation, not only into 422s
    assert statuses["POST /v1/certificates"] & {200, 202}, statuses
    assert statuses["GET /v1/certificates/{certificate_id}"] & {200, 404}, statuses
