"""Fleet limits on the real stack: shared rate-limit budgets defer work (never fail it, never send it
to the CA), and ACME Renewal Information moves renewals (through a directory that adds ARI in front
of Pebble, which has none)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

from certqueue.celery_app import lazy_app
from certqueue.db import session_scope
from certqueue.models import Certificate, Event, Issuance, Order, utcnow
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline
from tests.fakes.acme_directory_proxy import AcmeDirectoryProxy

pytestmark = pytest.mark.integration


def _require_services() -> None:
    why = services_available()
    if why:
        if os.environ.get("CERTQUEUE_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def limited(tmp_path) -> Iterator[Pipeline]:
    _require_services()
    # 2 new orders per ~11 s for the account: a burst of 2, then one every ~5.4 s (GCRA). Pebble is
    # not Let's Encrypt, so it has no client-side budget unless the settings give it one (issue 18)
    env = {
        "CERTQUEUE_RATE_LIMITS__CA_RULES": '["*=custom"]',
        "CERTQUEUE_RATE_LIMITS__NEW_ORDERS_PER_ACCOUNT": "2",
        "CERTQUEUE_RATE_LIMITS__NEW_ORDERS_PERIOD_HOURS": "0.003",
    }
    p = build_pipeline(tmp_path, backend="postgres", extra_env=env, pools=("acme",))
    yield p
    teardown_pipeline(p)


def test_over_budget_work_is_deferred_then_completes(limited):
    ids = [limited.request([f"budget{i}.example.test"]) for i in range(5)]
    # soon: two orders exist, the rest are deferred with nothing sent to the CA
    limited.wait_for(
        lambda: limited.count(Event, Event.kind == "deferred") >= 3, timeout=30, what="deferrals"
    )
    with session_scope(write=False) as s:
        ordered = {cid for (cid,) in s.execute(select(Order.certificate_id))}
    assert len(ordered) <= 3
    for cid in ids:
        limited.wait_state(cid, "ACTIVE", timeout=90)
    with session_scope(write=False) as s:
        orders = s.execute(select(Order).order_by(Order.created_at)).scalars().all()
        assert len(orders) == 5  # deferred work was never failed and never ordered twice
        gaps = [(b.created_at - a.created_at).total_seconds() for a, b in itertools.pairwise(orders[2:])]
        deferred = s.execute(select(Event).where(Event.kind == "deferred")).scalars().all()
    assert all(g > 3.0 for g in gaps), gaps  # after the burst, orders follow the budget's pace
    assert {e.reason for e in deferred} == {"rate_limited"}
    assert all(limited.state(cid) == "ACTIVE" for cid in ids)


@pytest.fixture
def lets_encrypt_rules(tmp_path) -> Iterator[Pipeline]:
    """Let's Encrypt production's rules forced on for Pebble (``*=letsencrypt``)."""
    _require_services()
    env = {"CERTQUEUE_RATE_LIMITS__CA_RULES": '["*=letsencrypt"]'}
    p = build_pipeline(tmp_path, backend="postgres", extra_env=env, pools=("acme",))
    yield p
    teardown_pipeline(p)


def test_lets_encrypt_rules_forced_on_for_the_test_ca_defer_the_51st_new_certificate(lets_encrypt_rules):
    """50 new certificates per registered domain per 7 days: the 51st waits (one unit comes back
    every 201.6 minutes) with nothing sent to the CA. Without ``ca_rules`` Pebble has no budget at
    all (the other tests here and issue 18's 60-certificate scenario)."""
    p = lets_encrypt_rules
    started = utcnow()
    ids = [p.request([f"n{i}.forced.test"]) for i in range(51)]
    p.wait_for(
        lambda: (
            p.count(Certificate, Certificate.state == "ACTIVE") == 50
            and p.count(Event, Event.kind == "deferred", Event.reason == "rate_limited") >= 1
        ),
        timeout=240,
        what="50 issued and one deferred",
    )
    with session_scope(write=False) as s:
        waiting = s.execute(select(Certificate).where(Certificate.state != "ACTIVE")).scalars().all()
        assert len(waiting) == 1 and waiting[0].id in ids
        # a burst may also meet the in-flight cap for a few seconds (a "capacity" deferral, by design:
        # two dispatch runs can each see room); the budget's deferral is the 51st's alone
        (deferred,) = (
            s.execute(select(Event).where(Event.kind == "deferred", Event.reason == "rate_limited"))
            .scalars()
            .all()
        )
        assert deferred.certificate_id == waiting[0].id and deferred.reason == "rate_limited"
        until = dt.datetime.fromisoformat(deferred.data["until"])
        assert started + dt.timedelta(minutes=200) < until < utcnow() + dt.timedelta(minutes=203)
        assert s.execute(select(Order).where(Order.certificate_id == waiting[0].id)).first() is None


@pytest.fixture
def small_domain_budget(tmp_path) -> Iterator[Pipeline]:
    """Custom rules on Pebble: 3 new certificates per registered domain per 7 days."""
    _require_services()
    env = {
        "CERTQUEUE_RATE_LIMITS__CA_RULES": '["*=custom"]',
        "CERTQUEUE_RATE_LIMITS__CERTIFICATES_PER_REGISTERED_DOMAIN": "3",
    }
    p = build_pipeline(tmp_path, backend="postgres", extra_env=env, pools=("acme",))
    yield p
    teardown_pipeline(p)


def test_a_fleet_under_one_registered_domain_renews_without_deferral(small_domain_budget):
    """The per-domain budget spent by three new certificates does not hold their renewals: Let's
    Encrypt exempts renewals of the same names from that limit (the limiter-level test runs 300)."""
    p = small_domain_budget
    ids = [p.request([f"r{i}.fleet.test"]) for i in range(3)]
    for cid in ids:
        p.wait_state(cid, "ACTIVE", timeout=60)
    for cid in ids:
        p.send("certqueue.renew", {"v": 1, "certificate_id": cid, "force": True})
    p.wait_for(
        lambda: p.count(Issuance) == 6 or p.count(Event, Event.kind == "deferred") > 0,
        timeout=90,
        what="renewals issued or deferred",
    )
    assert p.count(Event, Event.kind == "deferred") == 0
    for cid in ids:
        p.wait_state(cid, "ACTIVE", timeout=60)


@pytest.fixture
def with_ari(tmp_path) -> Iterator[tuple[Pipeline, AcmeDirectoryProxy]]:
    _require_services()
    proxies: list[AcmeDirectoryProxy] = []

    def front(pebble):
        proxy = AcmeDirectoryProxy(
            pebble.directory_url,
            pebble.ca_bundle,
            tmp_path,
            forward=True,
            pebble_management_url=pebble.management_url,
        ).start()
        proxies.append(proxy)
        return proxy.directory_url, str(proxy.combined_ca_bundle)

    p = build_pipeline(tmp_path, backend="postgres", pools=("acme",), acme_front=front)
    yield p, proxies[0]
    teardown_pipeline(p)
    proxies[0].stop()


def _run(task: str) -> dict:
    return lazy_app.get().send_task(task, queue="scan").get(timeout=60)


def test_ari_window_sets_renewal_and_an_incident_renews_now_with_replaces(with_ari):
    p, proxy = with_ari
    cid = p.request(["ari.example.test"])
    p.wait_state(cid, "ACTIVE", timeout=60)
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        iss = s.get(Issuance, c.current_issuance_id)
        assert iss.ari_cert_id and c.ari_next_check_at is not None
    start = (utcnow() + dt.timedelta(days=20)).replace(microsecond=0)
    end = start + dt.timedelta(days=2)
    proxy.set_window(iss.ari_cert_id, start, end, "https://ca.test/why/1")
    assert _run("certqueue.scan.ari")["checked"] >= 1
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        assert start <= c.renew_at <= end  # inside the CA's suggested window
        assert c.ari_next_check_at > utcnow() + dt.timedelta(hours=5)  # after Retry-After
        # the window itself is kept, to the second the CA sent it, and shown
        assert (c.ari_window_start, c.ari_window_end) == (start, end)
        assert c.ari_explanation_url == "https://ca.test/why/1"
    shown = json.loads(p.stack.cli("show", cid, "--json").stdout)["ari_window"]
    assert shown == {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "explanation_url": "https://ca.test/why/1",
    }
    # an incident: the window is in the past, so renewal is due now; the new order replaces the old
    proxy.mark_incident(iss.ari_cert_id)
    with session_scope() as s:
        s.execute(update(Certificate).where(Certificate.id == cid).values(ari_next_check_at=utcnow()))
    _run("certqueue.scan.ari")
    with session_scope(write=False) as s:
        assert s.get(Certificate, cid).renew_at <= utcnow()
    # this scan claims it, unless a dispatch started by a trailing nudge of the first issuance's
    # steps (nudges coalesce for up to a second) claimed it a moment before: once either way
    assert _run("certqueue.scan.due")["claimed"] in (0, 1)
    p.wait_for(
        lambda: p.count(Issuance, Issuance.certificate_id == cid) == 2 and p.state(cid) == "ACTIVE",
        timeout=60,
        what="renewal",
    )
    renewing = p.count(
        Event, Event.certificate_id == cid, Event.kind == "transition", Event.to_state == "RENEWING"
    )
    assert renewing == 1
    replaces = [pl.get("replaces") for pl in proxy.new_order_payloads()]
    assert replaces[-1] == iss.ari_cert_id
    assert replaces[0] is None  # the first issuance replaced nothing


@pytest.fixture
def idle(tmp_path) -> Iterator[Pipeline]:
    """The stack with no worker consuming: messages stay queued."""
    _require_services()
    p = build_pipeline(
        tmp_path, backend="postgres", pools=(), extra_env={"CERTQUEUE_AUTOMATION__MAX_QUEUE_DEPTH": "5"}
    )
    yield p
    teardown_pipeline(p)


def test_dispatch_never_claims_more_than_the_queue_can_take(idle):
    from certqueue import dispatch
    from certqueue.config import get_settings
    from certqueue.lifecycle.dispatch import queue_room

    settings = get_settings()

    def room() -> int | None:
        return queue_room(settings.automation.max_queue_depth, dispatch.acme_pressure(settings))

    assert room() == 5
    for _ in range(3):
        idle.send("certqueue.status", {"v": 1, "certificate_id": "cert_aaaaaaaaaaaaaaaaaaaa"})
    assert room() == 2
    for _ in range(4):
        idle.send("certqueue.status", {"v": 1, "certificate_id": "cert_aaaaaaaaaaaaaaaaaaaa"})
    assert room() == 0


@pytest.fixture
def two_cas(tmp_path) -> Iterator[tuple[Pipeline, str, str]]:
    """The primary CA requires external account binding (none is configured: it refuses us for
    good); the pipeline's own Pebble is the fallback."""
    _require_services()
    from devstack.pebble import PebbleServer

    started: list[PebbleServer] = []

    def front(fallback: PebbleServer) -> tuple[str, str]:
        primary = PebbleServer(
            http_port=fallback.http_port,
            dns_server=fallback.dns_server,
            eab_keys={"kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"},
        ).start()
        started.append(primary)
        bundle = tmp_path / "two-cas.pem"
        bundle.write_bytes(primary.ca_bundle.read_bytes() + fallback.ca_bundle.read_bytes())
        return primary.directory_url, str(bundle)

    p = build_pipeline(tmp_path, backend="postgres", pools=("acme",), acme_front=front)
    yield p, started[0].directory_url, p.pebble.directory_url
    teardown_pipeline(p)
    started[0].stop()


def test_ca_fallback_to_the_next_ca_with_its_own_account(two_cas):
    from certqueue.models import Account

    p, primary, fallback = two_cas
    cid = p.request(["fallback.example.test"], directory_url=primary, fallback_directory_urls=[fallback])
    p.wait_state(cid, "ACTIVE", timeout=60)
    with session_scope(write=False) as s:
        c = s.get(Certificate, cid)
        assert c.directory_url == fallback and c.directory_urls == [primary, fallback]
        ev = (
            s.execute(select(Event).where(Event.certificate_id == cid, Event.kind == "ca_fallback"))
            .scalars()
            .one()
        )
        assert ev.reason == "acme:externalAccountRequired"
        assert ev.data == {"from": primary, "to": fallback}
        accounts = s.execute(select(Account.directory_url)).scalars().all()
    assert accounts == [fallback]  # the primary never accepted an account
    # with no further CA, the same refusal is a FAILED certificate with the stable reason
    cid2 = p.request(["nofallback.example.test"], directory_url=primary, fallback_directory_urls=[])
    p.wait_state(cid2, "FAILED", timeout=60)
    with session_scope(write=False) as s:
        assert s.get(Certificate, cid2).last_error == "acme:externalAccountRequired"
