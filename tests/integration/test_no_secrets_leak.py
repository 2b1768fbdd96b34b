"""The whole pipeline with DEBUG logs (HTTP-01, DNS-01 with a TSIG secret, deployment to ACM with an
AWS secret, a database URL with a password, the REST API under uvicorn), then every log line, every
task argument and result in the result backend, every event row, every runtime_settings row, every
metric, `certqueue config show`, every API response, and the failure paths' tracebacks scanned for
private keys, the account key, the master key, tokens and secrets. Keys are looked for as PEM, as
bare base64 DER (no PEM headers, at each of the three base64 alignments), as DER hex and as their
raw private numbers. A second, embedded pipeline (SQLite, filesystem broker, SQLite result store)
is scanned the same way, files and bytes included."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
from sqlalchemy import select
from sqlalchemy.engine import make_url

from certqueue import certificates, crypto
from certqueue.acme.accounts import account_aad
from certqueue.db import session_scope
from certqueue.models import Account, Event, Issuance, RuntimeSetting
from devstack.bind import BindServer
from devstack.moto import MotoServer
from devstack.ports import free_port
from tests.conftest_stack import (
    Pipeline,
    build_pipeline,
    create_pg_database,
    services_available,
    teardown_pipeline,
)

pytestmark = pytest.mark.integration

AWS_SECRET = "cqTestAwsSecret0123456789abcdefghijklmnop"
DB_PASSWORD = "cqTestDbPassw0rd9876543210zyxw"  # trust auth ignores it; it must still never show
DIR_PASSWORD = "cqTestDirectoryPw1357924680abcdef"


def _fragments(secret: bytes | str) -> list[str]:
    raw = secret.encode() if isinstance(secret, str) else secret
    out = {raw.hex()[:32], base64.b64encode(raw).decode()[:24], base64.urlsafe_b64encode(raw).decode()[:24]}
    if isinstance(secret, str):
        out.add(secret[:24])
    return sorted(x for x in out if len(x) >= 16)


def _der_fragments(der: bytes, scalar: bytes) -> list[str]:
    """Pieces of a key's DER where its private number sits (not the public key, which every
    certificate repeats): hex, and base64 at each of the three alignments, so the key is found
    inside any larger base64 text."""
    pos = der.find(scalar)
    assert pos > 0
    out = {der[pos : pos + 16].hex()}
    for shift in range(3):
        out.add(base64.b64encode(der[pos + shift : pos + shift + 18]).decode())
    return sorted(out)


def _key_secrets(key_pem: bytes) -> tuple[list[str], bytes]:
    key = crypto.load_private_key(key_pem)
    numbers = key.private_numbers()
    d = getattr(numbers, "private_value", None) or numbers.d
    scalar = d.to_bytes((d.bit_length() + 7) // 8, "big")
    from cryptography.hazmat.primitives import serialization

    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return _fragments(scalar) + _der_fragments(der, scalar), scalar[:16]


def _stored_keys(p: Pipeline) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    texts: dict[str, list[str]] = {}
    raw: dict[str, bytes] = {}
    with session_scope(write=False) as s:
        for iss in s.execute(select(Issuance)).scalars():
            texts[f"issuance {iss.id}"], raw[f"issuance {iss.id}"] = _key_secrets(
                certificates.decrypt_key(iss)
            )
        for acct in s.execute(select(Account)).scalars():
            pem = certificates.keystore().decrypt(acct.key_enc, account_aad(acct.directory_url, acct.contact))
            texts[f"account {acct.id}"], raw[f"account {acct.id}"] = _key_secrets(pem)
    master = (p.stack.workdir / "master.key").read_bytes()
    for line in master.decode().splitlines():
        if line.startswith("key "):
            material = base64.b64decode(line.split()[-1])
            texts[f"master key {line.split()[1]}"] = [line.split()[-1], *_fragments(material)]
            raw[f"master key {line.split()[1]}"] = material
    return texts, raw


def _assert_clean(where: dict[str, str], secrets: dict[str, list[str]]) -> None:
    for place, text in where.items():
        assert "PRIVATE KEY" not in text, place
        for name, frags in secrets.items():
            for frag in frags:
                assert frag not in text, f"{name} found in {place}"


def _assert_clean_bytes(where: dict[str, bytes], raw: dict[str, bytes]) -> None:
    for place, data in where.items():
        assert b"PRIVATE KEY" not in data, place
        for name, piece in raw.items():
            assert piece not in data, f"{name} (raw bytes) found in {place}"


def _start_api(p: Pipeline) -> str:
    port = free_port()
    p.stack.start("api", ["serve", "--host", "127.0.0.1", "--port", str(port)], ready="Uvicorn running")
    return f"http://127.0.0.1:{port}"


def _api_responses(base: str, token: str, cids: list[str]) -> str:
    """What a client of the API sees, success and failure paths; the token also sent in a query
    string, where only the log filter can keep it out of uvicorn's access log."""
    auth = {"Authorization": f"Bearer {token}"}
    out = []
    with httpx.Client(base_url=base, timeout=30) as http:
        for path in ["/v1/certificates", *(f"/v1/certificates/{c}" for c in cids), "/health"]:
            out.append(http.get(path, headers=auth).text)
        out.append(http.get(f"/health?token={token}").text)
        out.append(http.get("/v1/certificates/cert_" + "z" * 20, headers=auth).text)  # 404
        out.append(http.post("/v1/certificates", headers=auth, json={"domains": ["x..y"]}).text)  # 403/422
        out.append(http.get("/v1/certificates", headers={"Authorization": "Bearer wrong"}).text)  # 401
        out.append(http.get("/openapi.json").text)
    return "\n".join(out)


def _redis_dump(url: str) -> str:
    r = redis_lib.Redis.from_url(url)
    stored = []
    for key in r.scan_iter(count=500):
        kind = r.type(key)
        if kind == b"string":
            stored.append(r.get(key) or b"")
        elif kind == b"list":
            stored.extend(r.lrange(key, 0, -1))
        elif kind == b"hash":
            stored.extend(r.hvals(key))
        elif kind == b"zset":
            stored.extend(r.zrange(key, 0, -1))
    return b"\n".join(stored).decode(errors="replace")


def _database_dump() -> str:
    with session_scope(write=False) as s:
        events = [
            {"kind": e.kind, "reason": e.reason, "data": e.data, "actor": e.actor}
            for e in s.execute(select(Event)).scalars()
        ]
        runtime = [{"key": r.key, "value": r.value} for r in s.execute(select(RuntimeSetting)).scalars()]
    return json.dumps({"events": events, "runtime_settings": runtime}, default=str)


def _refused_payload(p: Pipeline) -> None:
    """A failure path with a traceback in the worker's log: a broker message naming a CA by URL is
    refused. (No secret in it: with result_extended the refused message's arguments are kept in the
    result store, and those are the sender's, not ours.)"""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from certqueue.celery_app import lazy_app

    bad = {
        "v": 1,
        "request": {
            "domains": ["refused.example.test"],
            "directory_url": "http://169.254.169.254/latest/meta-data/",
        },
    }
    res = lazy_app.get().send_task("certqueue.issue", args=[bad], queue="acme")
    with pytest.raises(Exception, match="directory_url is not accepted") as info:
        res.get(timeout=60)
    assert not isinstance(info.value, CeleryTimeout)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, BindServer]]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    moto = MotoServer().start()
    bind = BindServer(zone="example.test").start()
    db_url, drop_db = create_pg_database()
    env = {
        "CERTQUEUE_CHALLENGES__RFC2136": json.dumps(
            bind.provider_config(propagation_timeout=20, polling_interval=0.3)
        ),
        "CERTQUEUE_CHALLENGES__DNS_RESOLVERS": json.dumps([bind.nameserver]),
        "CERTQUEUE_CHALLENGES__NAMESERVER_PORT": str(bind.port),
        "CERTQUEUE_LOGGING__LEVEL": "DEBUG",
        "CERTQUEUE_DATABASE__URL": make_url(db_url).set(password=DB_PASSWORD).render_as_string(False),
    }
    regions = [
        {
            "name": "us-east-1",
            "provider": "aws",
            "endpoint_url": moto.endpoint_url,
            "access_key_id": "testing",
            "secret_access_key": AWS_SECRET,
        }
    ]
    p = build_pipeline(
        tmp_path_factory.mktemp("leaks"),
        backend="postgres",
        extra_env=env,
        dns_server=bind.nameserver,
        regions=regions,
    )
    p.cleanups.insert(0, drop_db)  # runs after the stack is down
    p.stack.start_worker("propagate", regions=("us-east-1",))
    yield p, bind
    teardown_pipeline(p)
    bind.stop()
    moto.stop()


def test_no_key_token_or_secret_anywhere(leaky):
    p, bind = leaky
    from certqueue import tokens

    assert DB_PASSWORD in p.env["CERTQUEUE_DATABASE__URL"]  # the processes really use it
    with session_scope() as s:
        _tid, api_token = tokens.create_token(s, "leak-test", ["read"])
    a = p.request(["leak1.example.test", "www.leak1.example.test"])
    b = p.request(
        ["*.leak2.example.test", "leak2.example.test"], challenge_type="dns-01", dns_provider="rfc2136"
    )
    p.wait_state(a, "ACTIVE", timeout=90)
    p.wait_state(b, "ACTIVE", timeout=90)
    p.send("certqueue.renew", {"v": 1, "certificate_id": a, "force": True})
    p.wait_for(
        lambda: p.count(Issuance, Issuance.certificate_id == a) == 2 and p.state(a) == "ACTIVE",
        timeout=90,
        what="renewal",
    )
    _refused_payload(p)
    p.stack.cli("config", "set", "automation.retry_attempts=4")
    refused = p.stack.cli(
        "config", "set", f"acme.directory_url=https://acme:{DIR_PASSWORD}@ca.example.test/dir", check=False
    )
    assert refused.returncode == 2
    config_show = p.stack.cli("config", "show", "--json").stdout + p.stack.cli("config", "show").stdout
    assert '"database.url"' in config_show
    base = _start_api(p)
    api = _api_responses(base, api_token, [a, b])
    assert a in api and "leak1.example.test" in api  # the responses really are there to scan

    secrets, _raw = _stored_keys(p)
    secrets.update(
        {
            "tsig": _fragments(bind.secret),
            "aws": _fragments(AWS_SECRET),
            "api token": _fragments(api_token),
            "database password": _fragments(DB_PASSWORD),
            "directory password": _fragments(DIR_PASSWORD),
        }
    )
    assert len([k for k in secrets if k.startswith("issuance")]) == 3

    results = _redis_dump(p.env["CERTQUEUE_BROKER__URL"])
    assert "certificate_id" in results  # task arguments and results are really there to scan
    from certqueue.metrics import render_metrics

    metrics = render_metrics().decode()
    assert "certqueue_certificate_expiration_timestamp_seconds" in metrics
    logs = p.stack.all_logs()
    assert "DEBUG" in logs and "JWS payload" in logs  # the logs really are at DEBUG
    assert "Traceback" in logs and "directory_url is not accepted" in logs  # the failure path ran
    assert "GET /health?token=" in p.stack.log("api")  # uvicorn's access log line is there
    _assert_clean(
        {
            "logs": logs,
            "task arguments and results": results,
            "events and runtime_settings": _database_dump(),
            "metrics": metrics,
            "config show": config_show,
            "API responses": api,
        },
        secrets,
    )


def test_the_embedded_broker_and_its_result_store_hold_no_secret(tmp_path_factory: pytest.TempPathFactory):
    """SQLite and the filesystem broker: the message files (queued and processed) and the SQLite
    result store are read as bytes and as text."""
    tmp = tmp_path_factory.mktemp("leaks-embedded")
    p = build_pipeline(
        tmp,
        backend="sqlite",
        pools=("all",),
        extra_env={"CERTQUEUE_LOGGING__LEVEL": "DEBUG"},
    )
    try:
        cid = p.request(["embedded-leak.example.test"])
        p.wait_state(cid, "ACTIVE", timeout=90)
        _refused_payload(p)
        secrets, raw = _stored_keys(p)
        assert any(k.startswith("issuance") for k in secrets)
        broker_dir = Path(p.env["CERTQUEUE_BROKER__FILESYSTEM_PATH"])
        files = {str(f): f.read_bytes() for f in broker_dir.rglob("*") if f.is_file()}
        results_db = broker_dir.parent / "celery-results.db"
        assert results_db.exists()
        with sqlite3.connect(results_db) as conn:
            rows = [
                bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode()
                for table in [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
                for row in conn.execute(f'SELECT * FROM "{table}"')
                for v in row
                if v is not None
            ]
        store = b"\n".join(rows)
        assert b"certificate_id" in store  # results are really there to scan
        files["result store"] = store
        files["result store file"] = results_db.read_bytes()
        _assert_clean_bytes(files, raw)
        _assert_clean({k: v.decode(errors="replace") for k, v in files.items()}, secrets)
        _assert_clean({"logs": p.stack.all_logs()}, secrets)
    finally:
        teardown_pipeline(p)
