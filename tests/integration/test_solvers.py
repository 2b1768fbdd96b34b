"""Solvers chosen per name, end to end: one certificate whose names are proven by three solvers,
two RFC2136 solvers for two zones (each updating only its own zone: the wrong one would get
NOTZONE from BIND) and an HTTP-01 one, through real dns and acme workers, Pebble resolving
through BIND."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from certqueue import crypto
from certqueue.db import session_scope
from certqueue.models import Certificate, Challenge, Issuance
from devstack.bind import BindServer
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bind_server() -> Iterator[BindServer]:
    with BindServer(zone="example.test", extra_zones=("validation.test",)) as server:
        yield server


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def p(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, bind_server: BindServer
) -> Iterator[Pipeline]:
    backend = request.param
    why = services_available() if backend == "postgres" else None
    if why:
        pytest.fail(why)
    cfg = bind_server.provider_config(propagation_timeout=20, polling_interval=0.3)
    solvers = [
        {
            "name": "zone-example",
            "provider": "rfc2136",
            "config": {**cfg, "zone": "example.test"},
            "selector": {"dns_zones": ["example.test"]},
        },
        {
            "name": "zone-validation",
            "provider": "rfc2136",
            "config": {**cfg, "zone": "validation.test"},
            "selector": {"dns_zones": ["validation.test"]},
        },
        {"name": "web", "type": "http-01", "selector": {"dns_names": ["www.example.test"]}},
    ]
    env = {
        "CERTQUEUE_CHALLENGES__SOLVERS": json.dumps(solvers),
        "CERTQUEUE_CHALLENGES__DNS_RESOLVERS": json.dumps([bind_server.nameserver]),
        "CERTQUEUE_CHALLENGES__NAMESERVER_PORT": str(bind_server.port),
    }
    pipeline = build_pipeline(
        tmp_path_factory.mktemp("solvers"),
        backend=backend,
        extra_env=env,
        dns_server=bind_server.nameserver,
        pools=("acme", "dns") if backend == "postgres" else ("all",),
    )
    yield pipeline
    teardown_pipeline(pipeline)


def test_one_certificate_three_solvers(p: Pipeline) -> None:
    names = ["a.example.test", "b.validation.test", "www.example.test"]
    cid = p.request(names)  # no challenge type, no provider: the solvers decide per name
    p.wait_state(cid, "ACTIVE", timeout=120)
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        iss = s.get(Issuance, c.current_issuance_id)
        chs = {
            ch.identifier: (ch.type, ch.provider)
            for ch in s.execute(select(Challenge).where(Challenge.certificate_id == cid)).scalars()
        }
        assert c.challenge_map == {
            "a.example.test": "dns-01",
            "b.validation.test": "dns-01",
            "www.example.test": "http-01",
        }
    assert chs == {
        "a.example.test": ("dns-01", "zone-example"),
        "b.validation.test": ("dns-01", "zone-validation"),
        "www.example.test": ("http-01", None),
    }
    assert sorted(crypto.cert_info(iss.cert_pem).names) == sorted(names)
    p.wait_for(
        lambda: p.count(Challenge, Challenge.certificate_id == cid, Challenge.status != "cleaned") == 0,
        what="cleanup by each solver",
    )


def test_a_wildcard_goes_to_the_dns_solver_of_its_zone(p: Pipeline) -> None:
    cid = p.request(["*.w.validation.test"])
    p.wait_state(cid, "ACTIVE", timeout=120)
    with session_scope(write=False) as s:
        (ch,) = s.execute(select(Challenge).where(Challenge.certificate_id == cid)).scalars().all()
    assert (ch.type, ch.provider) == ("dns-01", "zone-validation")
