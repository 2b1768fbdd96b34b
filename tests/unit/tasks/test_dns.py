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
    that answered: tests/unit/dns/test_dns_propagation.py builds those); every address answered here."""
    cid, ch_id, _ = _challenge(challenge_name)
    _step(dns._present_step, cid, ch_id)
    _step(dns._wait_step, cid, ch_id)
    with session_scope(write=False) as s:
        kinds = [e.kind for e in s.query(Event).filter(Event.certificate_id == cid)]
    assert "dns_check" not in kinds
    assert _row(ch_id).status == "visible"
    with session_scope(write=False) as s:
        assert s.get_one(Certificate, cid).state == State.ISSUING  # the dns pool never moves the certificate


# --- present_all / cleanup_all: every challenge of an order in one task --------------------------


def _order_challenges(name: str, n: int, *, state: State = State.ISSUING) -> tuple[str, list[int], list[str]]:
    """A certificate whose order has ``n`` DNS-01 challenges at the same record name (a wildcard and
    its base name share one), each with its own value."""
    cid, first, value = _challenge(name, state=state)
    ids, values = [first], [value]
    with session_scope() as s:
        base = s.get_one(Challenge, first)
        for _ in range(n - 1):
            v = secrets.token_urlsafe(32)[:43]
            ch = Challenge(
                order_id=base.order_id,
                certificate_id=cid,
                identifier=f"*.{name.removeprefix('_acme-challenge.')}",
                authz_url="https://ca/a2",
                type="dns-01",
                url="https://ca/c2",
                dns_name=name,
                dns_value=v,
                provider="rfc2136",
                status="pending",
            )
            s.add(ch)
            s.flush()
            ids.append(ch.id)
            values.append(v)
    return cid, ids, values


class _CountingProvider:
    """The real provider, counting its present calls; ``fail_on``: the call that raises (transient);
    ``cleanup_fails``: the error that the removal of a value raises instead."""

    def __init__(self, fail_on: int | None = None, cleanup_fails: dict[str, Exception] | None = None) -> None:
        self.real = dns.provider_for("rfc2136")
        self.name = self.real.name
        self.presents = 0
        self.fail_on = fail_on
        self.cleanup_fails = cleanup_fails or {}

    def present(self, fqdn: str, value: str) -> Any:
        self.presents += 1
        if self.presents == self.fail_on:
            from certqueue.errors import RetryableError

            raise RetryableError("the nameserver refused the update", reason="dns:update")
        return self.real.present(fqdn, value)

    def cleanup(self, fqdn: str, value: str, handle: Any) -> None:
        if value in self.cleanup_fails:
            raise self.cleanup_fails[value]
        self.real.cleanup(fqdn, value, handle)

    def timeout(self) -> tuple[float, float]:
        return self.real.timeout()


def test_present_all_presents_every_value_and_returns_once_all_are_visible(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    cid, ids, values = _order_challenges(challenge_name, 2)
    out = _step(dns._present_all_step, cid, ids)
    assert out == {"certificate_id": cid, "status": "visible", "challenges": 2}
    published = _txt(bind, challenge_name)
    assert all(v in published for v in values)
    for ch_id in ids:
        row = _row(ch_id)
        assert row.status == "visible"
        assert row.handle is not None and row.handle["fqdn"] == challenge_name and row.handle["presented_at"]


@pytest.mark.parametrize("state", [State.ACTIVE, State.FAILED])
def test_present_all_does_nothing_for_a_certificate_no_longer_being_issued(
    settings: Settings, bind: BindServer, challenge_name: str, state: State
) -> None:
    cid, ids, values = _order_challenges(challenge_name, 2, state=state)
    assert _step(dns._present_all_step, cid, ids)["status"] == "noop"
    assert [_row(i).status for i in ids] == ["pending", "pending"]
    assert not any(v in _txt(bind, challenge_name) for v in values)


def test_present_all_ignores_challenges_of_another_certificate(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    _, ids, _ = _order_challenges(challenge_name, 1)
    other, other_ids, _ = _order_challenges(f"_acme-challenge.o{secrets.token_hex(4)}.example.test", 1)
    assert _step(dns._present_all_step, other, ids + other_ids)["challenges"] == 1
    assert _row(ids[0]).status == "pending"


def test_present_all_records_each_present_before_the_next_so_a_retry_presents_only_the_rest(
    settings: Settings, bind: BindServer, challenge_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid, ids, values = _order_challenges(challenge_name, 3)
    failing = _CountingProvider(fail_on=2)
    monkeypatch.setattr(dns, "provider_for", lambda _name: failing)
    from certqueue.errors import RetryableError

    with pytest.raises(RetryableError):
        _step(dns._present_all_step, cid, ids)
    assert [_row(i).status for i in ids] == ["presented", "pending", "pending"]
    again = _CountingProvider()
    monkeypatch.setattr(dns, "provider_for", lambda _name: again)
    assert _step(dns._present_all_step, cid, ids)["status"] == "visible"
    assert again.presents == 2  # the first was not presented a second time
    assert [_row(i).status for i in ids] == ["visible"] * 3
    assert all(v in _txt(bind, challenge_name) for v in values)


def test_present_all_waits_in_the_task_then_asks_to_come_back_for_what_is_not_visible(
    settings: Settings, bind: BindServer, challenge_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dns, "IN_TASK_VISIBILITY_WINDOW", 0.4)
    cid, ids, _ = _order_challenges(challenge_name, 2)
    _presented_without_record(cid, ids[1], challenge_name, ago=1)  # says presented; not in the zone
    with pytest.raises(Wait) as info:
        _step(dns._present_all_step, cid, ids)
    assert info.value.countdown == pytest.approx(POLLING_INTERVAL)
    # what was seen is kept (the Wait commits it); the missing one is checked again next time
    assert [_row(i).status for i in ids] == ["visible", "presented"]


def test_present_all_gives_up_after_the_propagation_timeout(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    cid, ids, _ = _order_challenges(challenge_name, 2)
    _presented_without_record(cid, ids[1], challenge_name, ago=PROPAGATION_TIMEOUT + 5)
    with pytest.raises(PermanentError) as info:
        _step(dns._present_all_step, cid, ids)
    assert info.value.reason == "dns:not_visible"
    assert challenge_name in info.value.message


def test_cleanup_all_removes_every_value_and_marks_the_rows(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    cid, ids, values = _order_challenges(challenge_name, 3)
    _step(dns._present_all_step, cid, ids[:2])
    dns.provider_for("rfc2136").present(challenge_name, values[2])  # presented, its commit lost
    assert all(v in _txt(bind, challenge_name) for v in values)
    out = _step(dns._cleanup_all_step, cid, ids)
    assert out == {"certificate_id": cid, "status": "cleaned", "failed": []}
    assert not any(v in _txt(bind, challenge_name) for v in values)
    for ch_id in ids:
        row = _row(ch_id)
        assert row.status == "cleaned" and row.cleaned_at is not None


def test_cleanup_all_records_a_permanent_failure_and_cleans_the_others(
    settings: Settings, bind: BindServer, challenge_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid, ids, values = _order_challenges(challenge_name, 2)
    _step(dns._present_all_step, cid, ids)
    refusing = _CountingProvider(
        cleanup_fails={values[0]: PermanentError("the zone refuses deletes", reason="dns:refused")}
    )
    monkeypatch.setattr(dns, "provider_for", lambda _name: refusing)
    out = _step(dns._cleanup_all_step, cid, ids)
    assert out == {"certificate_id": cid, "status": "cleanup_failed", "failed": ["dns:refused"]}
    first, second = _row(ids[0]), _row(ids[1])
    assert (first.status, first.error) == ("visible", "dns:refused")  # left for the reconciler's report
    assert (second.status, second.error) == ("cleaned", None)
    assert values[1] not in _txt(bind, challenge_name)
    # a cleaned row is not touched again
    assert _step(dns._cleanup_all_step, cid, ids[1:]) == {
        "certificate_id": cid,
        "status": "cleaned",
        "failed": [],
    }


# --- present_batch / cleanup_batch: many certificates' records in one task -----------------------


def _batch_step(
    step: Callable[..., dict[str, Any]], items: list[dict[str, Any]]
) -> tuple[dict[str, Any], Any]:
    with session_scope() as s:
        ctx = StepContext(session=s, task=None)  # type: ignore[arg-type]
        return step(ctx, items), ctx


def _followups(ctx: StepContext) -> list[Any]:
    """What the step asked to send: a task's (name, args), a chain's list of those."""
    out: list[Any] = []
    for sig in ctx.follow_ups:
        if sig.task == "celery.chain":
            out.append([(t.task, tuple(t.args)) for t in sig.tasks])
        else:
            out.append((sig.task, tuple(sig.args)))
    return out


def _batch_of(names: list[str], n: int = 2) -> list[tuple[dict[str, Any], list[int], list[str]]]:
    """One order per name, with ``n`` DNS-01 challenges each: (job, challenge ids, values)."""
    out = []
    for name in names:
        cid, ids, values = _order_challenges(name, n)
        out.append(({"certificate_id": cid, "purpose": "issue"}, ids, values))
    return out


def _items(batch: list[tuple[dict[str, Any], list[int], list[str]]]) -> list[dict[str, Any]]:
    return [{"job": job, "challenges": ids} for job, ids, _ in batch]


def test_present_batch_presents_every_certificate_and_validates_them_in_one_task(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    names = [challenge_name.replace("challenge.t", f"challenge.b{i}") for i in range(3)]
    batch = _batch_of(names)
    out, ctx = _batch_step(dns._present_batch_step, _items(batch))
    assert out == {"certificates": 3, "validate": 3, "alone": 0}
    # one validate batch for all three, nothing per certificate
    assert _followups(ctx) == [("certqueue.acme.validate_batch", ([job for job, _, _ in batch],))]
    for (job, ids, values), name in zip(batch, names, strict=True):
        assert [_row(i).status for i in ids] == ["visible", "visible"]
        assert all(v in _txt(bind, name) for v in values)


def test_present_batch_sends_a_certificate_whose_provider_fails_on_alone(
    settings: Settings, bind: BindServer, challenge_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [challenge_name.replace("challenge.t", f"challenge.f{i}") for i in range(3)]
    batch = _batch_of(names)
    failing = _CountingProvider(fail_on=4)  # the second certificate's second record
    monkeypatch.setattr(dns, "provider_for", lambda _name: failing)
    out, ctx = _batch_step(dns._present_batch_step, _items(batch))
    assert out == {"certificates": 3, "validate": 2, "alone": 1}
    (first, _, _), (second, second_ids, _), (third, _, _) = batch
    assert _followups(ctx) == [
        [
            ("certqueue.dns.present_all", (second["certificate_id"], second_ids)),
            ("certqueue.acme.validate", (second["certificate_id"],)),
        ],
        ("certqueue.acme.validate_batch", ([first, third],)),
    ]
    # what it presented before the failure is recorded: present_all presents only the rest
    assert [_row(i).status for i in second_ids] == ["presented", "pending"]
    assert failing.presents == 6


def test_present_batch_sends_a_certificate_not_visible_in_its_window_on_alone(
    settings: Settings, bind: BindServer, challenge_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dns, "IN_TASK_VISIBILITY_WINDOW", 0.4)
    names = [challenge_name.replace("challenge.t", f"challenge.w{i}") for i in range(2)]
    batch = _batch_of(names)
    (seen, _, _), (unseen, unseen_ids, _) = batch
    _presented_without_record(unseen["certificate_id"], unseen_ids[1], names[1], ago=1)
    out, ctx = _batch_step(dns._present_batch_step, _items(batch))
    assert out == {"certificates": 2, "validate": 1, "alone": 1}
    assert _followups(ctx) == [
        [
            ("certqueue.dns.present_all", (unseen["certificate_id"], unseen_ids)),
            ("certqueue.acme.validate", (unseen["certificate_id"],)),
        ],
        ("certqueue.acme.validate_batch", ([seen],)),
    ]
    assert [_row(i).status for i in unseen_ids] == ["visible", "presented"]


def test_present_batch_leaves_out_certificates_no_longer_issued_and_foreign_challenges(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    names = [challenge_name.replace("challenge.t", f"challenge.n{i}") for i in range(2)]
    batch = _batch_of(names)
    (live, live_ids, _), (done, done_ids, _) = batch
    with session_scope() as s:
        s.get_one(Certificate, done["certificate_id"]).state = State.ACTIVE
    # the live certificate's item also names the other one's challenges: they are not its own
    items = [{"job": live, "challenges": live_ids + done_ids}, {"job": done, "challenges": done_ids}]
    out, ctx = _batch_step(dns._present_batch_step, items)
    assert out == {"certificates": 2, "validate": 1, "alone": 0}
    assert _followups(ctx) == [("certqueue.acme.validate_batch", ([live],))]
    assert [_row(i).status for i in done_ids] == ["pending", "pending"]
    assert [_row(i).status for i in live_ids] == ["visible", "visible"]


def test_present_batch_again_presents_nothing_twice(
    settings: Settings, bind: BindServer, challenge_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [challenge_name.replace("challenge.t", f"challenge.r{i}") for i in range(2)]
    batch = _batch_of(names)
    _batch_step(dns._present_batch_step, _items(batch))
    again = _CountingProvider()
    monkeypatch.setattr(dns, "provider_for", lambda _name: again)
    out, _ = _batch_step(dns._present_batch_step, _items(batch))  # a redelivered message
    assert out["validate"] == 2 and again.presents == 0


def _two_zones(challenge_name: str, tag: str) -> tuple[str, str]:
    """A record name in the primary zone and one in BIND's second zone (``validation.test``)."""
    first = challenge_name.replace("challenge.t", f"challenge.{tag}")
    return first, first.replace(".example.test", ".validation.test")


def _header_and_body(ctx: StepContext) -> tuple[list[tuple[str, Any]], tuple[str, tuple[Any, ...]]]:
    sig = ctx.replacement
    assert sig is not None and sig.task == "celery.chord", sig
    header = [(t.task, tuple(t.args)) for t in sig.tasks]
    return header, (sig.body.task, tuple(sig.body.args))


def _body(results: list[Any], items: list[dict[str, Any]]) -> tuple[dict[str, Any], StepContext]:
    """The chord body's step on the zones' ``results``: its answer and what it asked to send."""
    with session_scope() as s:
        ctx = StepContext(session=s, task=None)  # type: ignore[arg-type]
        return dns._presented_batch_step(ctx, results, items), ctx


def test_present_batch_over_two_zones_is_a_chord_of_one_present_per_zone(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    names = _two_zones(challenge_name, "z")
    batch = _batch_of(list(names))
    items = _items(batch)
    out, ctx = _batch_step(dns._present_batch_step, items)
    assert out == {"certificates": 2, "zones": 2}
    header, body = _header_and_body(ctx)
    (job_a, ids_a, _), (job_b, ids_b, _) = batch
    # sorted by (provider, zone): example.test, then validation.test
    assert header == [
        ("certqueue.dns.present_zone", ([{"job": job_a, "challenges": ids_a}],)),
        ("certqueue.dns.present_zone", ([{"job": job_b, "challenges": ids_b}],)),
    ]
    assert body == ("certqueue.dns.presented_batch", (items,))
    assert ctx.follow_ups == []  # nothing else sent, nothing presented yet: the zones do that
    assert [_row(i).status for i in ids_a + ids_b] == ["pending"] * 4
    # each zone presents its own records; the body validates both in one batch
    results = [_batch_step(dns._present_zone_step, args[0])[0] for _, args in header]
    assert results == [
        {"ready": [job_a["certificate_id"]], "alone": [], "gone": []},
        {"ready": [job_b["certificate_id"]], "alone": [], "gone": []},
    ]
    for (_, ids, values), name in zip(batch, names, strict=True):
        assert [_row(i).status for i in ids] == ["visible", "visible"]
        assert all(v in _txt(bind, name) for v in values)
    out, bctx = _body(results, items)
    assert out == {"certificates": 2, "validate": 2, "alone": 0}
    assert _followups(bctx) == [("certqueue.acme.validate_batch", ([job_a, job_b],))]


def test_a_certificate_with_records_in_two_zones_is_ready_only_when_both_are(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    """One certificate's records in both zones, a second one in the first only: the first
    certificate is in both zones' items; a zone that backed off (its answer is not a report) sends
    it on alone, while the second, ready in its only zone, is validated."""
    names = _two_zones(challenge_name, "m")
    both, ids_both, _ = _order_challenges(names[0], 1)
    with session_scope() as s:
        base = s.get_one(Challenge, ids_both[0])
        other = Challenge(
            order_id=base.order_id,
            certificate_id=both,
            identifier=names[1].removeprefix("_acme-challenge."),
            authz_url="https://ca/a3",
            type="dns-01",
            url="https://ca/c3",
            dns_name=names[1],
            dns_value=secrets.token_urlsafe(32)[:43],
            provider="rfc2136",
            status="pending",
        )
        s.add(other)
        s.flush()
        ids_both.append(other.id)
    single, ids_single, _ = _order_challenges(names[0].replace(".m", ".n", 1), 1)
    job_both = {"certificate_id": both, "purpose": "issue"}
    job_single = {"certificate_id": single, "purpose": "issue"}
    items = [{"job": job_both, "challenges": ids_both}, {"job": job_single, "challenges": ids_single}]
    _, ctx = _batch_step(dns._present_batch_step, items)
    header, _ = _header_and_body(ctx)
    assert header == [
        (
            "certqueue.dns.present_zone",
            (
                [
                    {"job": job_both, "challenges": [ids_both[0]]},
                    {"job": job_single, "challenges": ids_single},
                ],
            ),
        ),
        ("certqueue.dns.present_zone", ([{"job": job_both, "challenges": [ids_both[1]]}],)),
    ]
    first = _batch_step(dns._present_zone_step, header[0][1][0])[0]
    assert first == {"ready": [both, single], "alone": [], "gone": []}
    backed_off = {"status": "backing_off", "reason": "db"}  # the second zone's task parked
    out, bctx = _body([first, backed_off], items)
    assert out == {"certificates": 2, "validate": 1, "alone": 1}
    assert _followups(bctx) == [
        [
            ("certqueue.dns.present_all", (both, sorted(ids_both))),
            ("certqueue.acme.validate", (both,)),
        ],
        ("certqueue.acme.validate_batch", ([job_single],)),
    ]


def test_the_chord_body_leaves_out_certificates_no_longer_issued(
    settings: Settings, bind: BindServer, challenge_name: str
) -> None:
    names = _two_zones(challenge_name, "g")
    batch = _batch_of(list(names))
    items = _items(batch)
    (job_a, _, _), (job_b, _, _) = batch
    results = [
        {"ready": [job_a["certificate_id"]], "alone": [], "gone": []},
        {"ready": [], "alone": [], "gone": [job_b["certificate_id"]]},
    ]
    out, bctx = _body(results, items)
    assert out == {"certificates": 2, "validate": 1, "alone": 0}
    assert _followups(bctx) == [("certqueue.acme.validate_batch", ([job_a],))]


def test_cleanup_batch_removes_every_order_and_retries_a_failing_one_alone(
    settings: Settings, bind: BindServer, challenge_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [challenge_name.replace("challenge.t", f"challenge.c{i}") for i in range(3)]
    batch = _batch_of(names)
    _batch_step(dns._present_batch_step, _items(batch))
    (_, _, _), (flaky, flaky_ids, flaky_values), (_, _, _) = batch
    from certqueue.errors import RetryableError

    flaky_provider = _CountingProvider(
        cleanup_fails={
            flaky_values[0]: RetryableError("the nameserver refused the update", reason="dns:update")
        }
    )
    monkeypatch.setattr(dns, "provider_for", lambda _name: flaky_provider)
    items = [{"certificate_id": job["certificate_id"], "challenges": ids} for job, ids, _ in batch]
    out, ctx = _batch_step(dns._cleanup_batch_step, items)
    assert out == {"certificates": 3, "cleaned": 2, "cleanup_failed": 0}
    assert _followups(ctx) == [("certqueue.dns.cleanup_all", (flaky["certificate_id"], flaky_ids))]
    for (job, ids, values), name in zip(batch, names, strict=True):
        if job is flaky:
            assert flaky_values[1] in _txt(bind, name)  # not reached: cleanup_all removes it
            continue
        assert [_row(i).status for i in ids] == ["cleaned", "cleaned"]
        assert not any(v in _txt(bind, name) for v in values)
