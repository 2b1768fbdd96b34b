"""certqueue.lifecycle.states: the guide's state machine, on both database backends.

The expected table is written out here from the guide ("Certificate States"), not copied from the
module, so a transition added or dropped in the code fails the first test.
"""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import func, select

from certqueue import db, events
from certqueue.config import Settings
from certqueue.errors import InvalidTransition
from certqueue.events import transition
from certqueue.lifecycle import states
from certqueue.lifecycle.states import TERMINAL, TRANSITIONS, can_transition
from certqueue.models import Certificate, Event, State

S = State
#: the guide's table: state -> the states it may move to
GUIDE: dict[State, set[State]] = {
    S.REQUESTED: {S.ISSUING},
    S.ISSUING: {S.ISSUED, S.FAILED},
    S.ISSUED: {S.ACTIVE},
    S.ACTIVE: {S.RENEWING, S.REVOKED, S.EXPIRED},
    # past notAfter a renewing certificate shows EXPIRED; the renewal in flight goes on and, when
    # it is served, takes it to ACTIVE (issue 14: the guide's table had no way out of RENEWING)
    S.RENEWING: {S.ACTIVE, S.EXPIRED},
    S.REVOKED: set(),
    S.EXPIRED: {S.ACTIVE},
    S.FAILED: {S.REQUESTED},
}
ALLOWED = sorted((a, b) for a, nxt in GUIDE.items() for b in nxt)
FORBIDDEN = sorted((a, b) for a, b in itertools.product(State, State) if b not in GUIDE[a])


def test_transitions_are_exactly_the_guides() -> None:
    assert set(TRANSITIONS) == set(State)
    assert {k: set(v) for k, v in TRANSITIONS.items()} == GUIDE


def test_the_matrix_covers_every_pair() -> None:
    assert len(ALLOWED) + len(FORBIDDEN) == len(State) ** 2
    assert len(ALLOWED) == 11
    assert len(FORBIDDEN) == 53


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(State, State)), ids=lambda s: str(s))
def test_can_transition_matrix(src: State, dst: State) -> None:
    assert can_transition(src, dst) is (dst in GUIDE[src])
    assert can_transition(src.value, dst.value) is (dst in GUIDE[src])  # plain strings from the DB


def test_terminal_states() -> None:
    assert TERMINAL == {S.REVOKED}
    for t in TERMINAL:
        assert not any(can_transition(t, d) for d in State)
    # FAILED is not terminal: the guide retries it through REQUESTED
    assert S.FAILED not in TERMINAL


MARK = object()  # a work_deadline (any value: only its presence counts)


@pytest.mark.parametrize(
    ("state", "deadline", "renewing", "working"),
    [
        (S.RENEWING, MARK, True, True),
        (S.RENEWING, None, True, True),
        (S.EXPIRED, MARK, True, True),  # the renewal in flight at expiry
        (S.EXPIRED, None, False, False),  # expired with nothing working on it
        (S.ISSUING, MARK, False, True),
        (S.ISSUING, None, False, True),
        (S.ACTIVE, MARK, False, False),  # a region retry sets the deadline of an ACTIVE one
        (S.ACTIVE, None, False, False),
        (S.ISSUED, MARK, False, False),
        (S.REQUESTED, MARK, False, False),
        (S.REVOKED, MARK, False, False),
        (S.FAILED, MARK, False, False),
    ],
    ids=lambda v: "deadline" if v is MARK else str(v),
)
def test_renewal_in_flight_and_in_pipeline(
    state: State, deadline: object, renewing: bool, working: bool
) -> None:
    assert states.renewal_in_flight(state, deadline) is renewing
    assert states.in_pipeline(state.value, deadline) is working


@pytest.mark.parametrize(
    ("state", "pending", "want"),
    [
        (S.ISSUED, 1, True),
        (S.ACTIVE, None, True),
        (S.RENEWING, 1, True),
        (S.EXPIRED, 1, True),  # the renewal finished issuing after expiry: deploy it
        (S.EXPIRED, None, False),
        (S.REVOKED, 1, False),
        (S.REVOKED, None, False),
        (S.FAILED, 1, False),
    ],
)
def test_deployable(state: State, pending: int | None, want: bool) -> None:
    assert states.deployable(state, pending) is want


def _new_cert(state: State, n: int = 0) -> str:
    cid = f"cert_states{n:08d}{state.value.lower()[:8]:a<8}"
    with db.session_scope() as s:
        s.add(
            Certificate(
                id=cid,
                domains=[f"s{n}.example.com"],
                dedupe_key=f"{n}-{state}",
                state=state,
                directory_url="https://acme.example/dir",
            )
        )
    return cid


def _events(cid: str) -> list[Event]:
    with db.session_scope(write=False) as s:
        return list(s.execute(select(Event).where(Event.certificate_id == cid).order_by(Event.id)).scalars())


@pytest.mark.parametrize(("src", "dst"), ALLOWED, ids=lambda s: str(s))
def test_allowed_transition_writes_state_and_one_event(db_settings: Settings, src: State, dst: State) -> None:
    cid = _new_cert(src)
    with db.session_scope() as s:
        cert = db.lock_certificate(s, cid)
        assert cert is not None
        ev = transition(s, cert, dst, reason="test", actor="pytest", data={"k": 1})
        assert ev.from_state == src and ev.to_state == dst
    with db.session_scope(write=False) as s:
        cert = s.get(Certificate, cid)
        assert cert is not None and cert.state == dst
    (event,) = _events(cid)
    assert (event.kind, event.from_state, event.to_state) == ("transition", src, dst)
    assert (event.reason, event.actor, event.data) == ("test", "pytest", {"k": 1})
    assert event.at is not None and event.at.tzinfo is not None


@pytest.mark.parametrize(("src", "dst"), ALLOWED[:3], ids=lambda s: str(s))
def test_rollback_removes_state_change_and_event_together(
    db_settings: Settings, src: State, dst: State
) -> None:
    cid = _new_cert(src)
    with pytest.raises(RuntimeError, match="boom"), db.session_scope() as s:
        cert = db.lock_certificate(s, cid)
        assert cert is not None
        transition(s, cert, dst, reason="doomed")
        s.flush()  # both rows reach the database inside the transaction...
        assert s.execute(select(func.count()).select_from(Event)).scalar_one() == 1
        raise RuntimeError("boom")
    # ...and leave it together
    with db.session_scope(write=False) as s:
        cert = s.get(Certificate, cid)
        assert cert is not None and cert.state == src
    assert _events(cid) == []


def test_every_forbidden_transition_raises_and_writes_nothing(db_settings: Settings) -> None:
    ids = {st: _new_cert(st, n) for n, st in enumerate(State)}
    wrong: list[str] = []
    for src, dst in FORBIDDEN:
        with db.session_scope() as s:
            cert = db.lock_certificate(s, ids[src])
            assert cert is not None
            try:
                transition(s, cert, dst, reason="nope")
            except InvalidTransition as exc:
                if exc.reason != f"transition:{src}->{dst}" or ids[src] not in str(exc):
                    wrong.append(f"{src}->{dst}: message/reason {exc.reason!r} {exc}")
                if cert.state != src:
                    wrong.append(f"{src}->{dst}: state changed in memory to {cert.state}")
            else:
                wrong.append(f"{src}->{dst}: allowed")
    assert wrong == []
    with db.session_scope(write=False) as s:
        assert s.execute(select(func.count()).select_from(Event)).scalar_one() == 0
        got = {c.id: c.state for c in s.execute(select(Certificate)).scalars()}
    assert got == {cid: st for st, cid in ids.items()}


def test_a_full_lifecycle_leaves_an_ordered_audit_trail(db_settings: Settings) -> None:
    path = [
        *(S.ISSUING, S.FAILED, S.REQUESTED, S.ISSUING, S.ISSUED, S.ACTIVE, S.RENEWING, S.ACTIVE),
        *(S.RENEWING, S.EXPIRED, S.ACTIVE),  # expired while renewing; the renewal is served later
        S.EXPIRED,
    ]
    cid = _new_cert(S.REQUESTED)
    for dst in path:
        with db.session_scope() as s:
            cert = db.lock_certificate(s, cid)
            assert cert is not None
            transition(s, cert, dst)
    with db.session_scope() as s:
        events.record(s, cid, "renewal", reason="not a state change")
    trail = _events(cid)
    moves = [(e.from_state, e.to_state) for e in trail if e.kind == "transition"]
    assert moves == list(zip([S.REQUESTED, *path[:-1]], path, strict=True))
    assert trail[-1].kind == "renewal" and trail[-1].from_state is None and trail[-1].to_state is None
    with db.session_scope() as s:
        cert = db.lock_certificate(s, cid)
        assert cert is not None
        with pytest.raises(InvalidTransition):
            transition(s, cert, S.RENEWING)  # an expired certificate is not renewed again
