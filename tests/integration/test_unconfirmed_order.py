"""An order the CA created but whose URL was never stored (the step died between Pebble's answer and
the commit) is found again in the account's order list and resumed, not ordered twice; a newOrder
that never reached the CA is ordered again. The order step runs in this process against a real
Pebble and a real database (SQLite and PostgreSQL); the crash is an exception raised where the URL
would have been committed, after the CA created the order. newOrder requests are counted at the
client's door (``AcmeClient._post_new_order``), and the CA's own view is read back from its order
list."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from certqueue.acme import accounts
from certqueue.acme.client import AcmeClient
from certqueue.certificates import CertificateRequest, create_certificate
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.models import Certificate, Challenge, Event, Order, State, utcnow
from certqueue.tasks import pipeline
from certqueue.tasks.base import StepContext
from tests.conftest_pebble import PebbleStack

pytestmark = pytest.mark.integration

_names = itertools.count()


class _Killed(BaseException):
    """Stands for the SIGKILL: nothing after it runs in the step (not even an ``except Exception``)."""


@pytest.fixture
def settings(
    db_url: str, settings_factory: Callable[..., Settings], pebble: PebbleStack, tmp_path: Path
) -> Settings:
    return settings_factory(
        database_url=db_url,
        broker={"filesystem_path": str(tmp_path / "broker")},
        acme={
            "directory_url": pebble.directory_url,
            "ca_bundle": pebble.ca_bundle,
            # an account of its own per test: its order list holds this test's orders only
            "email": f"orders-{next(_names)}-{tmp_path.name[-12:]}@example.com".lower(),
        },
        rate_limits={
            "certificates_per_registered_domain": 1000000,
            "duplicate_certificates": 10000,
            "new_orders_per_account": 1000000,
        },
    )


@pytest.fixture
def new_orders(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every newOrder the CA answered, by the URL it created."""
    created: list[str] = []
    real = AcmeClient._post_new_order

    def counted(self: AcmeClient, *args: Any, **kwargs: Any) -> Any:
        response, body = real(self, *args, **kwargs)
        created.append(str(response.headers.get("Location")))
        return response, body

    monkeypatch.setattr(AcmeClient, "_post_new_order", counted)
    yield created


def _cert(name: str, **kw: Any) -> str:
    with session_scope() as s:
        cert, created = create_certificate(s, CertificateRequest.build(domains=[name], **kw))
        assert created
        cert.state = State.ISSUING
        return cert.id


def _start(cid: str) -> dict[str, Any]:
    with session_scope() as s:
        ctx = StepContext(session=s, task=None)  # type: ignore[arg-type]  # the step never uses it
        cert = s.get(Certificate, cid)
        assert cert is not None
        return pipeline.start_order(ctx, cert, "issue")


def _start_killed_after_the_ca_answered(cid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step dies the moment the CA created the order, before its URL is committed."""
    real = AcmeClient.new_order

    def dies(self: AcmeClient, *args: Any, **kwargs: Any) -> Any:
        def killed(_res: Any) -> None:
            raise _Killed

        return real(self, *args, **{**kwargs, "on_created": killed})

    with monkeypatch.context() as m:
        m.setattr(AcmeClient, "new_order", dies)
        with pytest.raises(_Killed):
            _start(cid)


def _start_killed_before_the_request(cid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step dies after its order row is committed and before newOrder leaves: the CA has none."""

    def never_sent(self: AcmeClient, *args: Any, **kwargs: Any) -> Any:
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(AcmeClient, "_post_new_order", never_sent)
        with pytest.raises(_Killed):
            _start(cid)


def _expire_leases(cid: str) -> None:
    """What the dead step's lease does by itself, after ``order_lease_seconds``."""
    with session_scope() as s:
        for o in s.execute(select(Order).where(Order.certificate_id == cid)).scalars():
            o.lease_token = "dead-step"
            o.lease_until = utcnow() - dt.timedelta(seconds=1)


def _orders(cid: str) -> list[Order]:
    with session_scope(write=False) as s:
        return list(s.execute(select(Order).where(Order.certificate_id == cid).order_by(Order.id)).scalars())


def _listed_at_the_ca(settings: Settings) -> set[str]:
    """The account's orders as the CA lists them (every page)."""
    assert settings.acme.directory_url
    with session_scope() as s:
        client, _ = accounts.client_for(s, settings.acme.directory_url, settings.acme.email)
    url = client.acme._post_as_get(client.account_url).json()["orders"]
    out: set[str] = set()
    while url:
        page = client.acme._post_as_get(url)
        out |= set(page.json()["orders"])
        nxt = client.acme._get_links(page, "next")
        url = nxt[0] if nxt else None
    return out


def test_an_order_created_at_the_ca_but_never_stored_is_found_and_resumed(
    settings: Settings, new_orders: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # other orders of the same account first, so the one lost is on a later page of the CA's list
    # (Pebble pages it three at a time) among orders of other names that are stored
    for i in range(7):
        assert _start(_cert(f"other-{i}-{next(_names)}.unconfirmed.test"))["status"] == "ordered"
    cid = _cert(f"lost-{next(_names)}.unconfirmed.test")
    _start_killed_after_the_ca_answered(cid, monkeypatch)
    [orphan] = _orders(cid)
    assert orphan.order_url is None and orphan.status == "creating"
    lost_url = new_orders[-1]
    assert lost_url in _listed_at_the_ca(settings)
    _expire_leases(cid)

    out = _start(cid)

    assert out["status"] == "ordered"
    [resumed] = _orders(cid)
    assert resumed.id == orphan.id and resumed.order_url == lost_url and resumed.status == "pending"
    assert resumed.lease_until is None
    assert len(new_orders) == 8, "the redelivered step ordered again"
    with session_scope(write=False) as s:
        challenges = list(s.execute(select(Challenge).where(Challenge.order_id == orphan.id)).scalars())
        found = list(
            s.execute(select(Event).where(Event.certificate_id == cid, Event.kind == "order")).scalars()
        )
    assert [c.status for c in challenges] == ["presented"]
    assert [e.data for e in found] == [{"order": orphan.id, "found_at_ca": True}]


def test_a_new_order_that_never_reached_the_ca_is_placed_again(
    settings: Settings, new_orders: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = _cert(f"unsent-{next(_names)}.unconfirmed.test")
    _start_killed_before_the_request(cid, monkeypatch)
    _expire_leases(cid)

    assert _start(cid)["status"] == "ordered"

    first, second = _orders(cid)
    assert first.status == "abandoned" and first.order_url is None
    assert first.error is not None and "lists no such order" in first.error
    assert second.order_url == new_orders[0] and second.status == "pending"
    assert len(new_orders) == 1


def test_an_open_order_of_the_same_names_that_another_row_holds_is_not_taken(
    settings: Settings, new_orders: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two certificates of the same names on one account (another key type): the open order of one
    is stored, and the other's lost newOrder never takes it over."""
    name = f"twin-{next(_names)}.unconfirmed.test"
    holder = _cert(name)
    assert _start(holder)["status"] == "ordered"
    lost = _cert(name, key_type="rsa2048")
    _start_killed_before_the_request(lost, monkeypatch)
    _expire_leases(lost)

    assert _start(lost)["status"] == "ordered"

    [held] = _orders(holder)
    abandoned, placed = _orders(lost)
    assert held.order_url == new_orders[0]
    assert abandoned.status == "abandoned" and placed.order_url == new_orders[1] != held.order_url
