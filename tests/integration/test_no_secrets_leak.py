"""The whole pipeline with DEBUG logs (HTTP-01, DNS-01 with a TSIG secret, deployment to ACM with an
AWS secret), then every log line, every task argument and result in the result backend, every event
row and every metric scanned for private keys, the account key, the master key, tokens and secrets."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator

import pytest
import redis as redis_lib
from sqlalchemy import select

from certqueue import certificates, crypto
from certqueue.acme.accounts import account_aad
from certqueue.db import session_scope
from certqueue.devstack.bind import BindServer
from certqueue.devstack.moto import MotoServer
from certqueue.models import Account, Event, Issuance
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration

AWS_SECRET = "cqTestAwsSecret0123456789abcdefghijklmnop"


def _fragments(secret: bytes | str) -> list[str]:
    raw = secret.encode() if isinstance(secret, str) else secret
    out = {raw.hex()[:32], base64.b64encode(raw).decode()[:24], base64.urlsafe_b64encode(raw).decode()[:24]}
    if isinstance(secret, str):
        out.add(secret[:24])
    return sorted(x for x in out if len(x) >= 16)


def _private_scalar(key_pem: bytes) -> bytes:
    numbers = crypto.load_private_key(key_pem).private_numbers()
    d = getattr(numbers, "private_value", None) or numbers.d
    return d.to_bytes((d.bit_length() + 7) // 8, "big")


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pipeline, BindServer]]:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    moto = MotoServer().start()
    bind = BindServer(zone="example.test").start()
    env = {
        "CERTQUEUE_CHALLENGES__RFC2136": json.dumps(
            bind.provider_config(propagation_timeout=20, polling_interval=0.3)
        ),
        "CERTQUEUE_CHALLENGES__DNS_RESOLVERS": json.dumps([bind.nameserver]),
        "CERTQUEUE_CHALLENGES__NAMESERVER_PORT": str(bind.port),
        "CERTQUEUE_LOGGING__LEVEL": "DEBUG",
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
    p.stack.start_worker("propagate", regions=("us-east-1",))
    yield p, bind
    teardown_pipeline(p)
    bind.stop()
    moto.stop()


def test_no_key_token_or_secret_anywhere(leaky):
    p, bind = leaky
    from certqueue import tokens

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

    secrets: dict[str, list[str]] = {
        "tsig": _fragments(bind.secret),
        "aws": _fragments(AWS_SECRET),
        "api token": _fragments(api_token),
    }
    master = (p.stack.workdir / "master.key").read_bytes()
    secrets["master key file"] = [
        line.split()[-1] for line in master.decode().splitlines() if line.startswith("key ")
    ]
    with session_scope(write=False) as s:
        for iss in s.execute(select(Issuance)).scalars():
            secrets[f"issuance {iss.id}"] = _fragments(_private_scalar(certificates.decrypt_key(iss)))
        for acct in s.execute(select(Account)).scalars():
            pem = certificates.keystore().decrypt(acct.key_enc, account_aad(acct.directory_url, acct.contact))
            secrets[f"account {acct.id}"] = _fragments(_private_scalar(pem))
        events = json.dumps(
            [
                {"reason": e.reason, "data": e.data, "actor": e.actor}
                for e in s.execute(select(Event)).scalars()
            ],
            default=str,
        )
    assert len([k for k in secrets if k.startswith("issuance")]) == 3

    r = redis_lib.Redis.from_url(p.env["CERTQUEUE_BROKER__URL"])
    stored = []
    for key in r.scan_iter(count=500):
        kind = r.type(key)
        if kind == b"string":
            stored.append(r.get(key) or b"")
        elif kind == b"list":
            stored.extend(r.lrange(key, 0, -1))
        elif kind == b"hash":
            stored.extend(r.hvals(key))
    results = b"\n".join(stored).decode(errors="replace")
    assert "certificate_id" in results  # task arguments and results are really there to scan

    from certqueue.metrics import render_metrics

    metrics = render_metrics().decode()
    assert "certqueue_certificate_expiration_timestamp_seconds" in metrics
    logs = p.stack.all_logs()
    assert "DEBUG" in logs and "JWS payload" in logs  # the logs really are at DEBUG
    for where, text in {
        "logs": logs,
        "task arguments and results": results,
        "events": events,
        "metrics": metrics,
    }.items():
        assert "PRIVATE KEY" not in text, where
        for name, frags in secrets.items():
            for frag in frags:
                assert frag not in text, f"{name} found in {where}"
