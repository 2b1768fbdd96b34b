"""Named issuers end to end: three more Pebbles beside the pipeline's own (the issuer "default",
the guide's acme: section). ``alpha`` and ``beta`` require external account binding, each with its
own EAB pair and CA bundle; ``gamma`` requires EAB but is configured without it (it refuses us for
good) and falls back to ``beta``. Two acme workers race for ``beta``'s account."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from certqueue import crypto
from certqueue.db import session_scope
from certqueue.models import Account, Certificate, Event, Issuance, Order
from devstack.pebble import PebbleServer
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration

EAB = {
    "alpha": ("kid-alpha", "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"),
    "beta": ("kid-beta", "b2l5Y2VvbWZ4ZGFqc2hkZmtqYWhzZGtmamhhc2tkamZoYWtzamRoZmtqYXNoZGtm"),
    "gamma": ("kid-gamma", "Z2FtbWFnYW1tYWdhbW1hZ2FtbWFnYW1tYWdhbW1hZ2FtbWFnYW1tYWdhbW1hZ2Ft"),
}


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, dict[str, PebbleServer]]]:
    backend = request.param
    why = services_available() if backend == "postgres" else None
    if why:
        pytest.fail(why)
    tmp = tmp_path_factory.mktemp("issuers")
    p = build_pipeline(tmp, backend=backend, pools=())
    cas: dict[str, PebbleServer] = {}
    try:
        for name, (kid, key) in EAB.items():
            cas[name] = PebbleServer(
                http_port=p.pebble.http_port, dns_server=p.pebble.dns_server, eab_keys={kid: key}
            ).start()
        issuers = [
            {
                "name": n,
                "directory_url": cas[n].directory_url,
                "email": f"{n}@example.test",
                "eab_kid": EAB[n][0],
                "eab_hmac_key": EAB[n][1],
                "ca_bundle": str(cas[n].ca_bundle),
                "key_type": "ec384" if n == "beta" else None,
                "rate_limits": "none",
            }
            for n in ("alpha", "beta")
        ]
        issuers.append(
            {
                "name": "gamma",
                "directory_url": cas["gamma"].directory_url,
                "ca_bundle": str(cas["gamma"].ca_bundle),
                "fallback": ["beta"],
            }
        )
        p.env["CERTQUEUE_ISSUERS"] = json.dumps(issuers)
        p.install_settings()
        pool = "acme" if backend == "postgres" else "all"
        p.stack.start_worker(pool, name="worker-acme-1", concurrency=2)
        p.stack.start_worker(pool, name="worker-acme-2", concurrency=2)
        yield p, cas
    finally:
        teardown_pipeline(p)
        for ca in cas.values():
            ca.stop()


def _issuer_cn(cid: str) -> str:
    with session_scope(write=False) as s:
        iss = s.get(Issuance, s.get(Certificate, cid).current_issuance_id)
        return crypto.cert_info(iss.cert_pem).issuer


def _verify(cid: str, ca: PebbleServer, name: str) -> None:
    with session_scope(write=False) as s:
        iss = s.get(Issuance, s.get(Certificate, cid).current_issuance_id)
        crypto.verify_chain(iss.cert_pem, crypto.split_pem_chain(iss.chain_pem), [ca.roots_pem()], name=name)


def test_a_certificate_on_each_issuer_with_its_own_eab_account(world) -> None:
    p, cas = world
    a = p.request(["on-alpha.example.test"], issuer="alpha")
    b = p.request(["on-beta.example.test"], issuer="beta")
    d = p.request(["on-default.example.test"])
    for cid in (a, b, d):
        p.wait_state(cid, "ACTIVE", timeout=90)
    _verify(a, cas["alpha"], "on-alpha.example.test")
    _verify(b, cas["beta"], "on-beta.example.test")
    _verify(d, p.pebble, "on-default.example.test")
    with session_scope(write=False) as s:
        assert s.get(Certificate, b).key_type == "ec384"  # beta's default key type
        accounts = {(x.directory_url, x.contact, x.eab_kid) for x in s.execute(select(Account)).scalars()}
    assert (cas["alpha"].directory_url, "alpha@example.test", "kid-alpha") in accounts
    assert (cas["beta"].directory_url, "beta@example.test", "kid-beta") in accounts
    assert (p.pebble.directory_url, "admin@example.test", None) in accounts

    listed = {r["name"]: r for r in json.loads(p.stack.cli("issuers", "list", "--json").stdout)}
    assert set(listed) == {"default", "alpha", "beta", "gamma"}
    for n in ("alpha", "beta"):
        assert listed[n]["account_status"] == "valid" and listed[n]["account_url"].startswith("https://")
        assert listed[n]["eab_kid"] == f"kid-{n}"
    shown = json.loads(p.stack.cli("issuers", "show", "beta", "--json").stdout)
    assert shown["key_type"] == "ec384" and shown["rate_limits"] == "none"
    out = p.stack.cli("issuers", "show", "beta").stdout + p.stack.cli("config", "show").stdout
    assert EAB["beta"][1] not in out and EAB["alpha"][1] not in out
    r = p.stack.cli("issuers", "show", "nope", check=False)
    assert r.returncode == 2 and "unknown issuer 'nope'" in r.stderr


def test_fallback_from_an_issuer_that_refuses_us_to_the_next(world) -> None:
    p, cas = world
    cid = p.request(["via-gamma.example.test"], issuer="gamma")
    p.wait_state(cid, "ACTIVE", timeout=90)
    _verify(cid, cas["beta"], "via-gamma.example.test")
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        assert c.directory_urls == [cas["gamma"].directory_url, cas["beta"].directory_url]
        ev = (
            s.execute(select(Event).where(Event.certificate_id == cid, Event.kind == "ca_fallback"))
            .scalars()
            .one()
        )
        assert ev.reason == "acme:externalAccountRequired"


def test_one_account_per_issuer_when_workers_race(world) -> None:
    p, cas = world
    # a fresh contact makes a fresh account: six certificates at once, over two workers
    ids = [p.request([f"race{i}.example.test"], issuer="alpha", email="race@example.test") for i in range(6)]
    for cid in ids:
        p.wait_state(cid, "ACTIVE", timeout=120)
    with session_scope(write=False) as s:
        rows = list(
            s.execute(select(Account).where(Account.directory_url == cas["alpha"].directory_url)).scalars()
        )
        used = set(s.execute(select(Order.account_id).where(Order.certificate_id.in_(ids))).scalars())
    # the issuer's own contact is the account's: the request's email does not make a second account
    assert [(r.contact, r.eab_kid) for r in rows] == [("alpha@example.test", "kid-alpha")]
    assert used == {rows[0].id}
