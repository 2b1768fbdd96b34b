"""A CA outage longer than every quick retry ends ACTIVE, not FAILED (issue 12).

The old pipeline retried a transient CA error for a budget (about 23 minutes with the shipped
settings) and then failed the certificate for good. Now transient trouble never fails one: a few
quick retries inside the message (1, 2, 4, 8, 16 s shipped; started shorter here by
``automation.transient_retry_initial_seconds``: ``certqueue.lifecycle.failure``), then the work is
parked in the database and resumed (after ``automation.park_initial_seconds``, doubling). Here
the CA (the counting proxy in front of Pebble, so the CA's side of the outage is counted too)
refuses connections for longer than all the quick retries together, so every certificate has to
be parked and resumed to finish: the ``backoff`` events prove it was, and the states prove nothing
failed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from certqueue.db import session_scope
from certqueue.lifecycle import failure
from certqueue.models import Certificate, Event, Order
from tests.conftest_stack import Pipeline, build_pipeline, services_available, teardown_pipeline
from tests.fakes.acme_counting_proxy import CountingProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

#: the failure policy's two schedules, started shorter than shipped (the same table: 5 quick retries
#: doubling, then parking doubling), so the case takes seconds, not the shipped minutes
TRANSIENT_INITIAL_S = 0.25
PARK_INITIAL_S = 6.0
#: the quick retries inside one message, all together, with their jitter (the outage must outlast them)
QUICK_RETRY_BUDGET_S = 1.2 * sum(TRANSIENT_INITIAL_S * 2**i for i in range(failure.TRANSIENT_IN_TASK_RETRIES))
OUTAGE_S = QUICK_RETRY_BUDGET_S + 12


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[tuple[Pipeline, CountingProxy]]:
    why = services_available()
    if why:
        pytest.fail(why)
    proxies: list[CountingProxy] = []

    def front(pebble) -> tuple[str, str]:
        proxy = CountingProxy(pebble.directory_url, pebble.ca_bundle, tmp_path / "proxy").start()
        proxies.append(proxy)
        return proxy.directory_url, str(proxy.combined_ca_bundle)

    p = build_pipeline(
        tmp_path,
        backend="postgres",
        pools=("acme",),
        acme_front=front,
        extra_env={
            "CERTQUEUE_AUTOMATION__DISPATCH_INTERVAL_SECONDS": "1",
            "CERTQUEUE_AUTOMATION__SCAN_INTERVAL_SECONDS": "2",
            "CERTQUEUE_AUTOMATION__ORDER_LEASE_SECONDS": "10",
            "CERTQUEUE_AUTOMATION__TRANSIENT_RETRY_INITIAL_SECONDS": str(TRANSIENT_INITIAL_S),
            "CERTQUEUE_AUTOMATION__PARK_INITIAL_SECONDS": str(PARK_INITIAL_S),
        },
    )
    p.cleanups.insert(0, proxies[0].stop)
    try:
        p.stack.start_beat()
        yield p, proxies[0]
    finally:
        teardown_pipeline(p)


def _orders_created(p: Pipeline, ids: list[str]) -> int:
    with session_scope(write=False) as s:
        return len(
            s.execute(
                select(Order.id).where(Order.certificate_id.in_(ids), Order.order_url.is_not(None))
            ).all()
        )


def test_ca_outage_longer_than_every_quick_retry_ends_active(outage: tuple[Pipeline, CountingProxy]):
    p, proxy = outage
    # the account exists and the CA works before the outage
    first = p.request(["before.outage.test"])
    p.wait_state(first, "ACTIVE", timeout=90)
    ids = [p.request([f"o{i}.outage.test", f"www.o{i}.outage.test"]) for i in range(4)]
    # the outage starts once the orders exist at the CA, in the middle of their validation
    p.wait_for(lambda: _orders_created(p, ids) >= 1, timeout=60, what="orders created before the outage")
    proxy.down = True
    down_since = time.monotonic()
    p.wait_for(
        lambda: p.count(Event, Event.kind == "backoff", Event.certificate_id.in_(ids)) >= 1,
        timeout=OUTAGE_S + 60,
        what="work parked after its quick retries",
    )
    left = OUTAGE_S - (time.monotonic() - down_since)
    if left > 0:
        time.sleep(left)  # the outage lasts its full length: the CA is down, nothing to await
    assert {p.state(cid) for cid in ids} <= {"ISSUING", "ACTIVE"}, "a certificate failed during the outage"
    proxy.down = False
    for cid in ids:
        p.wait_state(cid, "ACTIVE", timeout=300)
    with session_scope(write=False) as s:
        certs = list(s.execute(select(Certificate).where(Certificate.id.in_(ids))).scalars())
        assert all(c.state == "ACTIVE" for c in certs)
        parked = {
            cid
            for (cid,) in s.execute(
                select(Event.certificate_id).where(Event.kind == "backoff", Event.certificate_id.in_(ids))
            )
        }
        failed = s.execute(
            select(Event.id).where(
                Event.certificate_id.in_(ids), Event.kind == "issuance", Event.reason == "failure"
            )
        ).all()
    assert parked, "no work was parked: the outage did not outlast the quick retries"
    assert not failed
    counts = proxy.counts()
    assert counts.get("refused (CA down)", 0) >= 5, counts  # the outage was real: requests met it
    # one order per certificate at the CA, outage or not
    assert counts.get("newOrder 201", 0) == len(ids) + 1, counts
