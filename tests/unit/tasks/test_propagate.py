"""Propagation's steps on a real database (SQLite and PostgreSQL) and the ``local`` target (files in
a folder): start (which regions get a deploy), deploy (what is written, what a failure leaves), and
record (when the certificate becomes ACTIVE, when a region is retried through an intent).

The lead is batching deploys (several regions or certificates per task): the calls into
certqueue.tasks.propagate are in the three adapters below (``_start``, ``_deploy``, ``_record``);
the assertions read only the database, the target's files and the follow-ups asked for.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import Retry
from sqlalchemy import select

from certqueue import certificates, intents
from certqueue.certificates import CertificateRequest, create_certificate
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.lifecycle import failure
from certqueue.models import Certificate, Deployment, Event, Intent, State, utcnow
from certqueue.tasks import propagate
from certqueue.tasks.base import StepContext
from tests.conftest_db import make_cert_pem


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    return {"eu": tmp_path / "eu", "us": tmp_path / "us", "lab": tmp_path / "lab"}


@pytest.fixture
def settings(
    db_url: str, settings_factory: Callable[..., Settings], tmp_path: Path, roots: dict[str, Path]
) -> Settings:
    return settings_factory(
        database_url=db_url,
        broker={"filesystem_path": str(tmp_path / "broker")},
        multi_region={
            "enabled": True,
            "regions": [
                {"name": "eu", "provider": "local", "path": str(roots["eu"])},
                {"name": "us", "provider": "local", "path": str(roots["us"])},
                {"name": "lab", "provider": "local", "path": str(roots["lab"]), "required": False},
            ],
        },
    )


# --- adapters: the only calls into the module under test ------------------------------------------------


def _start(job: dict[str, Any]) -> tuple[dict[str, Any], StepContext]:
    with session_scope() as s:
        ctx = StepContext(session=s, task=None)  # type: ignore[arg-type]
        out = propagate._propagate_step(ctx, job)
    return out, ctx


def _deploy(cid: str, region: str, iss_id: int) -> dict[str, Any]:
    with session_scope() as s:
        return propagate._deploy_step(StepContext(session=s, task=None), cid, region, iss_id)  # type: ignore[arg-type]


def _deploy_as_worker(cid: str, region: str, iss_id: int, *, transient: int) -> Any:
    """The deploy task's run_step with its failure hooks, as a worker runs it."""
    task = propagate.deploy
    task.push_request(
        id="d-1", args=[cid, region, iss_id], kwargs={"_transient": transient}, called_directly=False
    )
    try:
        return task.run_step(propagate._deploy_step, cid, region, iss_id)
    finally:
        task.pop_request()


def _record(cid: str, iss_id: int) -> tuple[dict[str, Any], StepContext]:
    with session_scope() as s:
        ctx = StepContext(session=s, task=None)  # type: ignore[arg-type]
        out = propagate._record_step(ctx, [], cid, iss_id)
    return out, ctx


# --- fixtures in the database ---------------------------------------------------------------------------


def _issued(name: str, *, state: State = State.ISSUED) -> tuple[str, int]:
    """A certificate with a new issuance waiting to be propagated (``pending_issuance_id``)."""
    with session_scope() as s:
        cert, _ = create_certificate(
            s, CertificateRequest.build(domains=[name], directory_url="https://ca/d")
        )
        leaf, key = make_cert_pem((name,))
        iss = certificates.store_issuance(s, cert, leaf, key)
        cert.pending_issuance_id = iss.id
        cert.state = state
        return cert.id, iss.id


def _deployments(cid: str) -> dict[str, Deployment]:
    with session_scope(write=False) as s:
        rows = list(s.execute(select(Deployment).where(Deployment.certificate_id == cid)).scalars())
        for r in rows:
            s.expunge(r)
        return {r.region: r for r in rows}


def _cert(cid: str) -> Certificate:
    with session_scope(write=False) as s:
        c = s.get_one(Certificate, cid)
        s.expunge(c)
        return c


def _open_propagations(cid: str) -> list[Intent]:
    with session_scope(write=False) as s:
        rows = list(
            s.execute(
                select(Intent).where(
                    Intent.certificate_id == cid, Intent.kind == "propagate", Intent.status.in_(intents.OPEN)
                )
            ).scalars()
        )
        for r in rows:
            s.expunge(r)
        return rows


def _events(cid: str, kind: str) -> list[Event]:
    with session_scope(write=False) as s:
        rows = list(s.execute(select(Event).where(Event.certificate_id == cid, Event.kind == kind)).scalars())
        for r in rows:
            s.expunge(r)
        return rows


def _header(ctx: StepContext) -> list[tuple[str, tuple[Any, ...], str | None]]:
    assert ctx.replacement is not None, "no chord"
    return [(sig.task, tuple(sig.args), sig.options.get("queue")) for sig in ctx.replacement.tasks]


# --- start ----------------------------------------------------------------------------------------------


def test_start_sends_one_deploy_per_region_on_the_region_s_queue(settings: Settings) -> None:
    cid, iss = _issued("start.example.com")
    with session_scope() as s:
        intents.record(s, "propagate", cid, actor="test")
    out, ctx = _start({"certificate_id": cid})
    assert out["status"] == "propagating"
    assert sorted(out["regions"]) == ["eu", "lab", "us"]
    assert sorted(_header(ctx)) == [
        ("certqueue.propagate.deploy", (cid, r, iss), f"propagate.{r}") for r in ("eu", "lab", "us")
    ]
    assert ctx.replacement.body.task == "certqueue.propagate.record"
    assert {r: d.status for r, d in _deployments(cid).items()} == {
        "eu": "pending",
        "us": "pending",
        "lab": "pending",
    }
    assert _cert(cid).work_deadline is not None  # the reconciler resends it if the chord is lost
    assert _open_propagations(cid) == []  # the intent is done: the work is in the chord now


def test_start_skips_a_region_that_has_the_issuance_already(settings: Settings) -> None:
    cid, iss = _issued("skip.example.com")
    _start({"certificate_id": cid})
    _deploy(cid, "eu", iss)
    _, ctx = _start({"certificate_id": cid})
    assert sorted(r for _, (_, r, _), _ in _header(ctx)) == ["lab", "us"]


def test_start_with_every_region_up_to_date_records_at_once(settings: Settings) -> None:
    cid, iss = _issued("uptodate.example.com")
    _start({"certificate_id": cid})
    for r in ("eu", "us", "lab"):
        _deploy(cid, r, iss)
    out, ctx = _start({"certificate_id": cid})
    assert out["status"] == "up_to_date"
    assert ctx.replacement is None
    assert [(sig.task, tuple(sig.args)) for sig in ctx.follow_ups] == [
        ("certqueue.propagate.record", ([], cid, iss))
    ]


def test_start_with_force_deploys_again(settings: Settings) -> None:
    cid, iss = _issued("force.example.com")
    _start({"certificate_id": cid})
    _deploy(cid, "eu", iss)
    _, ctx = _start({"certificate_id": cid, "force": True, "regions": ["eu"]})
    assert _header(ctx) == [("certqueue.propagate.deploy", (cid, "eu", iss), "propagate.eu")]


def test_start_ignores_a_region_no_longer_configured(settings: Settings) -> None:
    cid, _ = _issued("gone-region.example.com")
    out, _ = _start({"certificate_id": cid, "regions": ["eu", "mars"]})
    assert out["regions"] == ["eu"]
    assert set(_deployments(cid)) == {"eu"}


@pytest.mark.parametrize("state", [State.REVOKED, State.FAILED])
def test_start_does_nothing_for_a_certificate_that_must_not_be_deployed(
    settings: Settings, state: State
) -> None:
    cid, _ = _issued("stop.example.com", state=state)
    with session_scope() as s:
        intents.record(s, "propagate", cid, actor="test")
    out, ctx = _start({"certificate_id": cid})
    assert out["status"] == "noop"
    assert ctx.replacement is None
    assert ctx.follow_ups == []
    assert _deployments(cid) == {}
    assert _open_propagations(cid) == []  # closed, not left for dispatch to send again


def test_start_for_an_unknown_certificate_closes_its_intents(settings: Settings) -> None:
    with session_scope() as s:
        intents.record(s, "propagate", "cert_zzzzzzzzzzzzzzzzzzzz", actor="test")
    out, _ = _start({"certificate_id": "cert_zzzzzzzzzzzzzzzzzzzz"})
    assert out["status"] == "gone"
    assert _open_propagations("cert_zzzzzzzzzzzzzzzzzzzz") == []


# --- deploy ---------------------------------------------------------------------------------------------


def test_deploy_writes_the_bundle_and_records_the_fingerprint(
    settings: Settings, roots: dict[str, Path]
) -> None:
    cid, iss = _issued("deploy.example.com")
    _start({"certificate_id": cid})
    assert _deploy(cid, "eu", iss) == {"region": "eu", "status": "success"}
    d = _deployments(cid)["eu"]
    assert (d.status, d.attempts, d.issuance_id, d.last_error) == ("deployed", 1, iss, None)
    with session_scope(write=False) as s:
        from certqueue.models import Issuance

        assert d.fingerprint == s.get_one(Issuance, iss).fingerprint
    folder = Path(d.remote_ref or "")
    assert folder.is_relative_to(roots["eu"])
    assert (folder / "privkey.pem").read_text().startswith("-----BEGIN")
    assert (folder / "fullchain.pem").exists()
    assert not roots["us"].exists()  # only the region asked for
    assert [e.reason for e in _events(cid, "propagation")] == ["success"]


def test_deploy_twice_uploads_once(settings: Settings, roots: dict[str, Path]) -> None:
    cid, iss = _issued("twice.example.com")
    _start({"certificate_id": cid})
    _deploy(cid, "eu", iss)
    assert _deploy(cid, "eu", iss) == {"region": "eu", "status": "success", "skipped": True}
    assert _deployments(cid)["eu"].attempts == 1


def test_a_deploy_that_keeps_failing_parks_with_the_region_s_attempts_counted(
    settings: Settings, tmp_path: Path
) -> None:
    cid, iss = _issued("parked.example.com")
    _start({"certificate_id": cid})
    blocker = tmp_path / "eu"
    blocker.write_text("a file where the folder should be")  # writes under it fail (retryable "io")
    with pytest.raises(Retry):
        _deploy_as_worker(cid, "eu", iss, transient=0)
    assert _deployments(cid)["eu"].attempts == 0  # a quick retry counts nothing yet
    out = _deploy_as_worker(cid, "eu", iss, transient=failure.TRANSIENT_IN_TASK_RETRIES)
    assert out["status"] == "pending"
    d = _deployments(cid)["eu"]
    assert (d.status, d.attempts) == ("pending", 1)
    assert d.last_error and d.last_error.startswith("local")


# --- record ---------------------------------------------------------------------------------------------


def test_record_activates_when_every_required_region_has_the_issuance(settings: Settings) -> None:
    cid, iss = _issued("active.example.com")
    _start({"certificate_id": cid})
    _deploy(cid, "eu", iss)
    _deploy(cid, "us", iss)
    _deploy(cid, "lab", iss)
    out, ctx = _record(cid, iss)
    assert out["regions"] == {"eu": "success", "us": "success", "lab": "success"}
    c = _cert(cid)
    assert (c.state, c.current_issuance_id, c.pending_issuance_id) == (State.ACTIVE, iss, None)
    assert c.work_deadline is None
    assert ctx.nudge  # capacity freed
    assert _open_propagations(cid) == []


def test_record_waits_for_a_required_region_and_retries_only_that_one(settings: Settings) -> None:
    cid, iss = _issued("partial.example.com")
    _start({"certificate_id": cid})
    _deploy(cid, "eu", iss)
    _deploy(cid, "lab", iss)
    before = utcnow()
    out, _ = _record(cid, iss)
    assert out["regions"]["us"] == "pending"
    c = _cert(cid)
    assert c.state == State.ISSUED  # not ACTIVE without every required region
    (retry,) = _open_propagations(cid)
    assert retry.params == {"regions": ["us"]}
    assert retry.not_before > before  # waits in the database (backoff), not in the broker
    assert c.work_deadline is not None and c.work_deadline > retry.not_before


def test_record_activates_without_an_optional_region_and_retries_it(settings: Settings) -> None:
    cid, iss = _issued("optional.example.com")
    _start({"certificate_id": cid})
    _deploy(cid, "eu", iss)
    _deploy(cid, "us", iss)
    _record(cid, iss)
    assert _cert(cid).state == State.ACTIVE
    (retry,) = _open_propagations(cid)
    assert retry.params == {"regions": ["lab"]}


def test_record_retry_delay_grows_with_the_region_s_attempts(settings: Settings) -> None:
    cid, iss = _issued("backoff.example.com")
    _start({"certificate_id": cid})
    for r in ("eu", "lab"):
        _deploy(cid, r, iss)
    with session_scope() as s:
        d = s.execute(
            select(Deployment).where(Deployment.certificate_id == cid, Deployment.region == "us")
        ).scalar_one()
        d.attempts = 5
    before = utcnow()
    _record(cid, iss)
    (retry,) = _open_propagations(cid)
    # backoff(5, initial=10): 160 s give or take the jitter, far past a first attempt's 10 s
    assert retry.not_before - before > dt.timedelta(seconds=100)


def test_record_of_a_renewal_activates_the_new_issuance(settings: Settings) -> None:
    cid, old = _issued("renewal.example.com", state=State.ACTIVE)
    with session_scope() as s:
        cert = s.get_one(Certificate, cid)
        cert.current_issuance_id, cert.pending_issuance_id = old, None
        leaf, key = make_cert_pem(("renewal.example.com",))
        new = certificates.store_issuance(s, cert, leaf, key)
        cert.pending_issuance_id = new.id
        cert.state = State.RENEWING
        new_id = new.id
    _start({"certificate_id": cid})
    for r in ("eu", "us", "lab"):
        _deploy(cid, r, new_id)
    _record(cid, new_id)
    c = _cert(cid)
    assert (c.state, c.current_issuance_id, c.pending_issuance_id) == (State.ACTIVE, new_id, None)


def _renewal(name: str) -> tuple[str, int, int]:
    """An ACTIVE certificate (``old`` current) with a renewed issuance ``new`` pending."""
    cid, old = _issued(name, state=State.ACTIVE)
    with session_scope() as s:
        cert = s.get_one(Certificate, cid)
        cert.current_issuance_id, cert.pending_issuance_id = old, None
    return cid, old, 0


def test_start_deploys_again_a_region_that_holds_an_older_issuance(settings: Settings) -> None:
    cid, old, _ = _renewal("older.example.com")
    _start({"certificate_id": cid})
    for r in ("eu", "us", "lab"):
        _deploy(cid, r, old)
    with session_scope() as s:
        cert = s.get_one(Certificate, cid)
        leaf, key = make_cert_pem(("older.example.com",))
        new = certificates.store_issuance(s, cert, leaf, key)
        cert.pending_issuance_id = new.id
        cert.state = State.RENEWING
        new_id = new.id
    _, ctx = _start({"certificate_id": cid})
    assert sorted(_header(ctx)) == [
        ("certqueue.propagate.deploy", (cid, r, new_id), f"propagate.{r}") for r in ("eu", "lab", "us")
    ]


def test_record_clears_the_deadline_of_an_active_certificate_propagated_again(settings: Settings) -> None:
    """A propagate request for an ACTIVE certificate (a region added, a forced redeploy): nothing
    is activated, and once every region has it the reconciler has nothing left to resend."""
    cid, current, _ = _renewal("again.example.com")
    _start({"certificate_id": cid, "force": True})
    assert _cert(cid).work_deadline is not None
    for r in ("eu", "us", "lab"):
        _deploy(cid, r, current)
    out, ctx = _record(cid, current)
    assert out["state"] == State.ACTIVE
    assert _cert(cid).work_deadline is None
    assert not ctx.nudge  # nothing was activated: no capacity freed
