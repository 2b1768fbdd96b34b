"""``certqueue issue --dry-run`` and ``renew --dry-run`` end to end: the real ACME exchange with a
Pebble CA (which has no staging twin: its configured directory is used, with a note), the HTTP-01
challenge answered by a real ``certqueue http01`` responder from the token rows the dry run writes,
and nothing stored afterwards: no certificate, order, issuance, account or key row, no challenge
token left for the responder, no request or event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certqueue.db import session_scope
from certqueue.models import (
    Account,
    Certificate,
    Challenge,
    Event,
    Http01Token,
    Intent,
    Issuance,
    Order,
    TlsAlpn01Token,
)
from devstack.bind import BindServer
from tests.conftest_stack import Pipeline, build_pipeline, teardown_pipeline
from tests.integration.test_dns01 import _txt
from tests.unit.cli.test_cli import active_certificate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STORED = (Certificate, Issuance, Order, Account, Challenge, Http01Token, TlsAlpn01Token, Intent, Event)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    # Pebble, the embedded default and an HTTP-01 responder; no worker: a dry run needs none
    p = build_pipeline(tmp_path_factory.mktemp("dry-run"), backend="sqlite", pools=())
    yield p
    teardown_pipeline(p)


def counts(p: Pipeline) -> dict[str, int]:
    return {model.__tablename__: p.count(model) for model in STORED}


def test_issue_dry_run_orders_from_the_ca_and_stores_nothing(ca: Pipeline) -> None:
    before = counts(ca)
    r = ca.stack.cli("issue", "--dry-run", "dry.example.test", "www.dry.example.test", check=False)
    assert r.returncode == 0, (r.stdout, r.stderr, ca.stack.log("http01")[-2000:])
    assert "the CA issued a certificate" in r.stdout and "not stored" in r.stdout
    # Pebble has no staging twin: the configured directory, said once on stderr
    assert "has no known staging directory" in r.stderr
    assert "throwaway account" in r.stderr
    assert counts(ca) == before == {name: 0 for name in before}


def test_issue_dry_run_json_says_what_the_ca_issued(ca: Pipeline) -> None:
    r = ca.stack.cli("issue", "--dry-run", "json.dry.example.test", "-o", "json", check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True and out["error"] is None
    assert out["domains"] == ["json.dry.example.test"]
    assert out["directory_url"] == ca.pebble.directory_url
    assert out["serial"] and out["not_after"]
    assert counts(ca) == {model.__tablename__: 0 for model in STORED}


def test_a_dry_run_the_ca_refuses_exits_non_zero_with_its_error(ca: Pipeline) -> None:
    # no responder: Pebble cannot fetch the token, so the authorization is invalid
    ca.stack.stop("http01")
    try:
        r = ca.stack.cli("issue", "--dry-run", "refused.dry.example.test", check=False)
    finally:
        ca.stack.start_http01(ca.http_port)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "dry run: refused.dry.example.test: failed: authorization for refused.dry.example.test" in r.stdout
    assert counts(ca) == {model.__tablename__: 0 for model in STORED}


def test_renew_dry_run_orders_the_certificates_names_and_changes_nothing(ca: Pipeline) -> None:
    cid, _ = active_certificate(("renew.dry.example.test", "www.renew.dry.example.test"))
    before: dict[str, Any] = counts(ca)
    with session_scope(write=False) as s:
        c = s.get_one(Certificate, cid)
        was = (c.state, c.current_issuance_id, c.renew_at)
    r = ca.stack.cli("renew", "--dry-run", cid, "--json", check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["certificate_id"] == cid and out["ok"] is True
    assert out["domains"] == ["renew.dry.example.test", "www.renew.dry.example.test"]
    assert counts(ca) == before  # one certificate, one issuance, its events: as they were
    with session_scope(write=False) as s:
        c = s.get_one(Certificate, cid)
        assert (c.state, c.current_issuance_id, c.renew_at) == was
    assert ca.count(Order) == 0 and ca.count(Http01Token) == 0


def test_staging_is_refused_for_a_ca_without_a_staging_twin(ca: Pipeline, tmp_path: Path) -> None:
    before = counts(ca)
    for args in (
        ("issue", "--staging", "s.example.test"),
        ("issue", "--dry-run", "--staging", "s.example.test"),
    ):
        r = ca.stack.cli(*args, check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "has no known staging directory: drop --staging" in lines[0], lines
    assert counts(ca) == before


def test_a_stored_account_is_used_and_left_as_it_is(ca: Pipeline) -> None:
    from certqueue.acme.accounts import client_for

    with session_scope() as s:  # the account a first issuance would register
        _client, account_id = client_for(s, ca.pebble.directory_url, "admin@example.test")
    with session_scope(write=False) as s:
        stored = s.get_one(Account, account_id)
        was = (stored.account_url, stored.key_enc, stored.status)
    before = counts(ca)
    try:
        r = ca.stack.cli("issue", "--dry-run", "account.dry.example.test", check=False)
        assert r.returncode == 0, r.stderr
        assert "throwaway account" not in r.stderr  # the stored one signed the order
        assert ca.count(Account) == 1
        with session_scope(write=False) as s:
            stored = s.get_one(Account, account_id)
            assert (stored.account_url, stored.key_enc, stored.status) == was
        assert counts(ca) == before
    finally:
        from certqueue.acme.accounts import forget_account

        forget_account(ca.pebble.directory_url, "admin@example.test")
        with session_scope() as s:
            s.delete(s.get_one(Account, account_id))


# --- DNS-01: Pebble resolving through BIND, the TXT records written by RFC 2136 ----------------------


@pytest.fixture(scope="module")
def bind_server() -> Iterator[BindServer]:
    with BindServer(zone="example.test") as server:
        yield server


@pytest.fixture(scope="module")
def dns_ca(tmp_path_factory: pytest.TempPathFactory, bind_server: BindServer) -> Iterator[Pipeline]:
    env = {
        "CERTQUEUE_CHALLENGES__DNS_PROVIDER": "rfc2136",
        "CERTQUEUE_CHALLENGES__RFC2136": json.dumps(
            bind_server.provider_config(propagation_timeout=20, polling_interval=0.3)
        ),
        "CERTQUEUE_CHALLENGES__DNS_RESOLVERS": json.dumps([bind_server.nameserver]),
        "CERTQUEUE_CHALLENGES__NAMESERVER_PORT": str(bind_server.port),
    }
    p = build_pipeline(
        tmp_path_factory.mktemp("dry-run-dns"),
        backend="sqlite",
        pools=(),
        extra_env=env,
        dns_server=bind_server.nameserver,
    )
    yield p
    teardown_pipeline(p)


def test_a_dns01_dry_run_presents_checks_and_removes_its_records(
    dns_ca: Pipeline, bind_server: BindServer
) -> None:
    r = dns_ca.stack.cli(
        "issue", "--dry-run", "*.wild.example.test", "wild.example.test", "--challenge", "dns-01", check=False
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "the CA issued a certificate" in r.stdout
    # both names' TXT values were at BIND while the CA looked; none is left
    assert _txt(bind_server, "_acme-challenge.wild.example.test.") == []
    assert counts(dns_ca) == {model.__tablename__: 0 for model in STORED}
