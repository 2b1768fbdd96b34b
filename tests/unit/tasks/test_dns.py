"""The dns pool's steps (present, wait until visible, clean up) on a real database (SQLite and
PostgreSQL) and a real BIND with the RFC 2136 provider: what each step leaves in the challenge row
and in the zone, for success, the states that make a step a no-op, a value not yet visible (wait,
then give up with ``dns:not_visible``) and a cleanup whose presentation was never recorded."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from certqueue.certificates import CertificateRequest, create_certificate
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.dns.propagation import query_txt
from certqueue.errors import PermanentError
from certqueue.models import Certificate, Challenge, Event, Order, State, utcnow
from certqueue.tasks import dns
from certqueue.tasks.base import StepContext, Wait
from devstack.bind import BindServer

PROPAGATION_TIMEOUT = 20.0
POLLING_INTERVAL = 0.3


@pytest.fixture
def settings(
    db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path, bind: BindServer
) -> Settings:
    return settings_factory(
        database_url=db_url,
        broker={"filesystem_path": str(tmp_path / "broker")},
        challenges={
            "dns_provider": "rfc2136",
            "rfc2136": bind.provider_config(
                propagation_timeout=PROPAGATION_TIMEOUT, polling_interval=POLLING_INTERVAL
            ),
            "dns_resolvers": [bind.nameserver],
            "nameserver_port": bind.port,
        },
    )


def _step(step: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    with session_scope() as s:
        return step(StepContext(session=s, task=None), *args)  # type: ignore[arg-type]


def _challenge(name: str, *, state: State = State.ISSUING, status: str = "pending") -> tuple[str, int, str]:
    value = secrets.token_urlsafe(32)[:43]
    with session_scope() as s:
        cert, _ = create_certificate(
            s,
            CertificateRequest.build(
                domains=[name.removeprefix("_acme-challenge.")], directory_url="https://ca/d"
            ),
        )
        cert.state = state
        order = Order(certificate_id=cert.id, csr_pem="csr", key_enc=b"k", status="pending")
        s.add(order)
        s.flush()
        ch = Challenge(
            order_id=order.id,
            certificate_id=cert.id,
            identifier=name,
            authz_url="https://ca/a",
            type="dns-01",
            url="https://ca/c",
            dns_name=name,
            dns_value=value,
            provider="rfc2136",
            status=status,
        )
        s.add(ch)
        s.flush()
        return cert.id, ch.id, value


def _row(ch_id: int) -> Challenge:
    with session_scope(write=False) as s:
        ch = s.get_one(Challenge, ch_id)
        s.expunge(ch)
        return ch


def _txt(bind: BindServer, name: str) -> tuple[str, ...]:
    values, error = query_txt(name, "127.0.0.1", bind.port, timeout=2.0)
    assert error is None, error
    return values


def test_present_publishes_the_value_and_records_where(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    cid, ch_id, value = _challenge(challenge_name)
    assert _step(dns._present_step, cid, ch_id) == {"challenge": ch_id, "status": "presented"}
    row = _row(ch_id)
    assert row.status == "presented"
    assert row.handle is not None
    assert row.handle["fqdn"] == challenge_name
    assert row.handle["provider"] == "rfc2136"
    assert row.handle["presented_at"]
    assert value in _txt(bind, challenge_name)


@pytest.mark.parametrize("state", [State.ACTIVE, State.FAILED, State.REQUESTED])
def test_present_does_nothing_for_a_certificate_no_longer_being_issued(
    settings: Settings, bind: BindServer, challenge_name: str, state: State
) -> None:
    cid, ch_id, value = _challenge(challenge_name, state=state)
    assert _step(dns._present_step, cid, ch_id)["status"] == "noop"
    assert _row(ch_id).status == "pending"
    assert value not in _txt(bind, challenge_name)


def test_present_again_is_a_no_op(settings: Settings, bind: BindServer, challenge_name: str) -> None:
    cid, ch_id, _ = _challenge(challenge_name, status="visible")
    assert _step(dns._present_step, cid, ch_id) == {"challenge": ch_id, "status": "visible"}
    assert _txt(bind, challenge_name) == ()


def test_a_challenge_of_another_certificate_is_not_touched(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    _, ch_id, _ = _challenge(challenge_name)
    other, _, _ = _challenge(f"_acme-challenge.o{secrets.token_hex(4)}.example.test")
    assert _step(dns._present_step, other, ch_id)["status"] == "noop"
    assert _row(ch_id).status == "pending"


def test_wait_marks_a_visible_value_visible(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    cid, ch_id, _ = _challenge(challenge_name)
    _step(dns._present_step, cid, ch_id)
    assert _step(dns._wait_step, cid, ch_id) == {"challenge": ch_id, "status": "visible"}
    assert _row(ch_id).status == "visible"


def _presented_without_record(cid: str, ch_id: int, name: str, *, ago: float) -> None:
    """A row that says 'presented' (``ago`` seconds ago) for a value that is not in the zone."""
    with session_scope() as s:
        ch = s.get_one(Challenge, ch_id)
        ch.status = "presented"
        ch.handle = {
            "fqdn": name,
            "provider": "rfc2136",
            "presented_at": (utcnow() - dt.timedelta(seconds=ago)).isoformat(),
            "data": None,
        }


def test_wait_asks_to_come_back_after_the_polling_interval_while_not_visible(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    cid, ch_id, _ = _challenge(challenge_name)
    _presented_without_record(cid, ch_id, challenge_name, ago=1)
    with pytest.raises(Wait) as info:
        _step(dns._wait_step, cid, ch_id)
    assert info.value.countdown == pytest.approx(POLLING_INTERVAL)
    assert _row(ch_id).status == "presented"


def test_wait_gives_up_after_the_propagation_timeout(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    cid, ch_id, _ = _challenge(challenge_name)
    _presented_without_record(cid, ch_id, challenge_name, ago=PROPAGATION_TIMEOUT + 5)
    with pytest.raises(PermanentError) as info:
        _step(dns._wait_step, cid, ch_id)
    assert info.value.reason == "dns:not_visible"
    assert challenge_name in info.value.message


def test_cleanup_removes_the_value_and_marks_the_row(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    cid, ch_id, value = _challenge(challenge_name)
    _step(dns._present_step, cid, ch_id)
    assert value in _txt(bind, challenge_name)
    assert _step(dns._cleanup_step, cid, ch_id) == {"challenge": ch_id, "status": "cleaned"}
    assert value not in _txt(bind, challenge_name)
    row = _row(ch_id)
    assert row.status == "cleaned"
    assert row.cleaned_at is not None


def test_cleanup_removes_a_value_whose_presentation_was_never_recorded(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    """The provider call happened but its commit did not (a worker killed in between): the row has
    no handle, the record is in the zone, and cleanup finds it by the challenge's name."""
    cid, ch_id, value = _challenge(challenge_name)
    dns.provider_for("rfc2136").present(challenge_name, value)
    assert _row(ch_id).handle is None
    assert value in _txt(bind, challenge_name)
    _step(dns._cleanup_step, cid, ch_id)
    assert value not in _txt(bind, challenge_name)
    assert _row(ch_id).status == "cleaned"


def test_cleanup_of_a_cleaned_challenge_is_a_no_op(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    cid, ch_id, _ = _challenge(challenge_name, status="cleaned")
    assert _step(dns._cleanup_step, cid, ch_id) == {"challenge": ch_id, "status": "cleaned"}
    assert _row(ch_id).cleaned_at is None  # untouched


def test_a_clean_visible_check_writes_no_partial_check_event(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    """A ``dns_check`` event is for a partial check only (an address skipped or silent beside one
    that answered: tests/unit/test_dns_propagation.py builds those); every address answered here."""
    cid, ch_id, _ = _challenge(challenge_name)
    _step(dns._present_step, cid, ch_id)
    _step(dns._wait_step, cid, ch_id)
    with session_scope(write=False) as s:
        kinds = [e.kind for e in s.query(Event).filter(Event.certificate_id == cid)]
    assert "dns_check" not in kinds
    assert _row(ch_id).status == "visible"
    with session_scope(write=False) as s:
        assert s.get_one(Certificate, cid).state == State.ISSUING  # the dns pool never moves the certificate
