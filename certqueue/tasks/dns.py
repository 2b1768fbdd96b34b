"""The ``dns`` pool: DNS-01 present, wait until visible at every authoritative nameserver, clean up.

Owns the DNS side of ``challenges`` rows (provider, handle, presented/visible/cleaned). The
provider's handle is stored in the row, so any worker can clean up.

One task per certificate and step, whatever its number of names: ``certqueue.dns.present_all``
presents every pending challenge of an order (each recorded in a short transaction of its own right
after its provider call, so a retry never presents it twice), then checks visibility itself for a
short bounded window (``IN_TASK_VISIBILITY_WINDOW``; a primary updated by RFC 2136 answers at
once). What is still not visible is a retry with the provider's polling interval as countdown,
until its propagation timeout; then the certificate's order fails with the stable reason
``dns:not_visible`` and the records are removed. ``certqueue.dns.cleanup_all`` removes an order's
records. ``certqueue.dns.present_batch`` does the same for a batch's new orders in one task (every
record presented, then all checked together), sends one ``certqueue.acme.validate_batch`` for the
certificates whose records are all visible and the others on alone (``present_all`` | validate);
``certqueue.dns.cleanup_batch`` removes many orders' records. The single-challenge tasks
(``present``, ``wait_visible``, ``cleanup``) and their steps stay registered for messages sent
before this layout; nothing sends them any more.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from certqueue import events
from certqueue.config import get_settings
from certqueue.dns.base import DNSProvider
from certqueue.dns.propagation import check_visible
from certqueue.dns.zones import Resolver, configured_resolver, follow_cnames
from certqueue.errors import CertqueueError, PermanentError
from certqueue.lifecycle import states
from certqueue.models import Certificate, Challenge, utcnow
from certqueue.tasks.base import CertqueueTask, StepContext, Wait, classify
from certqueue.tasks.pipeline import PipelineTask, present_then_validate, task

log = logging.getLogger("certqueue.dns")


def resolver_config() -> Resolver:
    """The resolver the settings name (the core's: ``dns.zones.configured_resolver``)."""
    return configured_resolver()


def provider_for(name: str) -> DNSProvider:
    """A provider by DNS solver name (challenges.solvers) or by provider name."""
    from certqueue import solvers

    provider: DNSProvider = solvers.load(get_settings(), name)
    return provider


class DnsTask(PipelineTask):
    """Permanent failures fail the certificate's order; persistent transient ones park it."""

    abstract = True


def _load(
    ctx: StepContext, certificate_id: str, challenge_id: int
) -> tuple[Certificate | None, Challenge | None]:
    ch = ctx.session.get(Challenge, challenge_id)
    if ch is None or ch.certificate_id != certificate_id:
        return None, None
    return ctx.session.get(Certificate, certificate_id), ch


def _end_reads(ctx: StepContext) -> None:
    """End the read transaction before a call to a DNS provider or nameserver: nothing is held
    while it answers (on SQLite a write transaction holds the whole database's write lock); what the
    step writes afterwards goes into a transaction of its own."""
    ctx.session.commit()


def _present_step(ctx: StepContext, certificate_id: str, challenge_id: int) -> dict[str, Any]:
    cert, ch = _load(ctx, certificate_id, challenge_id)
    if cert is None or ch is None or not states.in_pipeline(cert.state, cert.work_deadline):
        return {"challenge": challenge_id, "status": "noop"}
    if ch.status != "pending":
        return {"challenge": challenge_id, "status": ch.status}
    provider = provider_for(ch.provider or "")
    _end_reads(ctx)
    fqdn = follow_cnames(ch.dns_name or "", resolver_config())
    handle = provider.present(fqdn, ch.dns_value or "")
    ch.handle = {
        "fqdn": fqdn,
        "provider": provider.name,
        "presented_at": utcnow().isoformat(),
        "data": handle,
    }
    ch.status = "presented"
    return {"challenge": challenge_id, "status": "presented"}


@shared_task(bind=True, base=DnsTask, name="certqueue.dns.present")
def present(self: DnsTask, certificate_id: str, challenge_id: int, _transient: int = 0) -> Any:
    return self.run_step(_present_step, certificate_id, challenge_id)


def _wait_step(ctx: StepContext, certificate_id: str, challenge_id: int) -> dict[str, Any]:
    cert, ch = _load(ctx, certificate_id, challenge_id)
    if cert is None or ch is None or not states.in_pipeline(cert.state, cert.work_deadline):
        return {"challenge": challenge_id, "status": "noop"}
    if ch.status != "presented":
        return {"challenge": challenge_id, "status": ch.status}
    provider = provider_for(ch.provider or "")
    timeout, interval = provider.timeout()
    fqdn = (ch.handle or {}).get("fqdn") or ch.dns_name or ""
    _end_reads(ctx)
    result = check_visible(
        fqdn,
        ch.dns_value or "",
        resolver_cfg=resolver_config(),
        also_recursive=get_settings().challenges.check_recursive,
    )
    if result.visible:
        ch.status = "visible"
        notes = result.notes()
        if notes:  # addresses this worker cannot route, or that stayed silent beside one that answered
            events.record(
                ctx.session,
                certificate_id,
                "dns_check",
                reason="partial",
                data={"challenge": challenge_id, "notes": notes[:20]},
            )
        return {"challenge": challenge_id, "status": "visible"}
    elapsed = (utcnow() - ch.updated_at).total_seconds() if ch.updated_at else 0.0
    presented_at = (ch.handle or {}).get("presented_at")
    if presented_at:
        elapsed = (utcnow() - dt.datetime.fromisoformat(presented_at)).total_seconds()
    if elapsed > timeout:
        raise PermanentError(
            f"TXT record at {fqdn} not visible at every authoritative nameserver "
            f"after {int(timeout)}s ({result.reason})",
            reason="dns:not_visible",
        )
    raise Wait(interval)


@shared_task(bind=True, base=DnsTask, name="certqueue.dns.wait_visible")
def wait_visible(self: DnsTask, certificate_id: str, challenge_id: int, _transient: int = 0) -> Any:
    return self.run_step(_wait_step, certificate_id, challenge_id)


def _cleanup_step(ctx: StepContext, certificate_id: str, challenge_id: int) -> dict[str, Any]:
    ch = ctx.session.get(Challenge, challenge_id)
    if ch is None or ch.status == "cleaned":
        return {"challenge": challenge_id, "status": "cleaned"}
    if ch.type == "dns-01" and ch.provider:
        provider = provider_for(ch.provider)
        _end_reads(ctx)
        handle = ch.handle or {}
        # no handle: the present may have happened without its commit; find the name the same way
        fqdn = handle.get("fqdn") or follow_cnames(ch.dns_name or "", resolver_config())
        provider.cleanup(fqdn, ch.dns_value or "", handle.get("data"))
    ch.status = "cleaned"
    ch.cleaned_at = utcnow()
    return {"challenge": challenge_id, "status": "cleaned"}


class CleanupTask(CertqueueTask):
    abstract = True

    def on_permanent(self, ctx: StepContext, exc: CertqueueError, *args: Any) -> Any:
        # a cleanup that cannot succeed is recorded; the reconciler reports it, nothing else fails
        ch = ctx.session.get(Challenge, args[1])
        if ch is not None:
            ch.error = exc.reason
        return {"challenge": args[1], "status": "cleanup_failed", "reason": exc.reason}


@shared_task(bind=True, base=CleanupTask, name="certqueue.dns.cleanup", ignore_result=True)
def cleanup(self: CleanupTask, certificate_id: str, challenge_id: int, _transient: int = 0) -> Any:
    return self.run_step(_cleanup_step, certificate_id, challenge_id)


# --- one task per certificate: every challenge of its order -------------------------------------

#: seconds one run of ``present_all`` checks visibility itself before it asks to come back after the
#: provider's polling interval (bounded: the dns pool's slots are not held while DNS propagates)
IN_TASK_VISIBILITY_WINDOW = 3.0
#: the first pause between two checks in that window (doubling, at most the polling interval)
FIRST_PAUSE = 0.05


@dataclass(frozen=True)
class _Record:
    """A challenge's TXT record, read once (no ORM object outlives a commit in these steps)."""

    certificate_id: str
    id: int
    provider: str
    fqdn: str
    value: str
    presented_at: str | None


def _challenges(ctx: StepContext, certificate_id: str, challenge_ids: Sequence[int]) -> list[Challenge]:
    ids = [int(i) for i in challenge_ids]
    return list(
        ctx.session.execute(
            select(Challenge)
            .where(Challenge.id.in_(ids), Challenge.certificate_id == certificate_id)
            .order_by(Challenge.id)
        ).scalars()
    )


def _pending(chs: Sequence[Challenge]) -> list[tuple[str, int, str, str, str]]:
    """The challenges still to present: (certificate, id, provider, record name, value)."""
    return [
        (c.certificate_id, c.id, c.provider or "", c.dns_name or "", c.dns_value or "")
        for c in chs
        if c.status == "pending"
    ]


def _presented(chs: Sequence[Challenge]) -> list[_Record]:
    """The challenges presented already (a redelivered task), waiting to be seen."""
    return [
        _Record(
            c.certificate_id,
            c.id,
            c.provider or "",
            (c.handle or {}).get("fqdn") or c.dns_name or "",
            c.dns_value or "",
            (c.handle or {}).get("presented_at"),
        )
        for c in chs
        if c.status == "presented"
    ]


def _present(
    ctx: StepContext, providers: dict[str, DNSProvider], todo: Sequence[tuple[str, int, str, str, str]]
) -> list[_Record]:
    """Present each record of ``todo``, each recorded (committed) right after its provider call, so
    a retry never presents it again; a provider's error is raised with the earlier ones recorded."""
    cfg = resolver_config()
    out: list[_Record] = []
    for cid, ch_id, provider_name, name, value in todo:
        provider = providers[provider_name]
        fqdn = follow_cnames(name, cfg)
        handle = provider.present(fqdn, value)
        presented_at = utcnow().isoformat()
        ctx.session.execute(
            update(Challenge)
            .where(Challenge.id == ch_id, Challenge.status == "pending")
            .values(
                status="presented",
                handle={
                    "fqdn": fqdn,
                    "provider": provider.name,
                    "presented_at": presented_at,
                    "data": handle,
                },
                updated_at=utcnow(),
            )
        )
        ctx.session.commit()  # recorded before the next provider call: a retry never presents it again
        out.append(_Record(cid, ch_id, provider_name, fqdn, value, presented_at))
    return out


def _check_once(ctx: StepContext, waiting: Sequence[_Record]) -> list[tuple[_Record, Any]]:
    """Every record of ``waiting`` asked for once; the visible ones are marked so (one UPDATE) and
    committed. Returns the others, each with what its check found."""
    cfg, recursive = resolver_config(), get_settings().challenges.check_recursive
    still: list[tuple[_Record, Any]] = []
    seen: list[int] = []
    for rec in waiting:
        result = check_visible(rec.fqdn, rec.value, resolver_cfg=cfg, also_recursive=recursive)
        if not result.visible:
            still.append((rec, result))
            continue
        seen.append(rec.id)
        notes = result.notes()
        if notes:  # addresses this worker cannot route, or that stayed silent beside one that answered
            events.record(
                ctx.session,
                rec.certificate_id,
                "dns_check",
                reason="partial",
                data={"challenge": rec.id, "notes": notes[:20]},
            )
    if seen:
        ctx.session.execute(
            update(Challenge)
            .where(Challenge.id.in_(seen), Challenge.status == "presented")
            .values(status="visible", updated_at=utcnow())
        )
    ctx.session.commit()
    return still


def _present_all_step(ctx: StepContext, certificate_id: str, challenge_ids: Sequence[int]) -> dict[str, Any]:
    cert = ctx.session.get(Certificate, certificate_id)
    if cert is None or not states.in_pipeline(cert.state, cert.work_deadline):
        return {"certificate_id": certificate_id, "status": "noop"}
    chs = _challenges(ctx, certificate_id, challenge_ids)
    pending, waiting = _pending(chs), _presented(chs)
    _end_reads(ctx)
    providers = {n: provider_for(n) for n in {p[2] for p in pending}}  # each built once
    waiting.extend(_present(ctx, providers, pending))
    _wait_all_visible(ctx, certificate_id, waiting)
    return {"certificate_id": certificate_id, "status": "visible", "challenges": len(chs)}


def _check_in_window(
    ctx: StepContext,
    waiting: Sequence[_Record],
    interval: Callable[[list[tuple[_Record, Any]]], float],
    judge: Callable[[list[tuple[_Record, Any]]], None] | None = None,
) -> list[tuple[_Record, Any]]:
    """Check the records (``_check_once``) until all are visible or ``IN_TASK_VISIBILITY_WINDOW``
    has passed, pausing from ``FIRST_PAUSE``, doubling, at most ``interval(still)``; ``judge(still)``
    runs after every round that left some (it may raise). Returns what is still not visible."""
    deadline = time.monotonic() + IN_TASK_VISIBILITY_WINDOW
    pause = FIRST_PAUSE
    still: list[tuple[_Record, Any]] = []
    while waiting:
        still = _check_once(ctx, waiting)
        if not still:
            return []
        if judge is not None:
            judge(still)
        every = interval(still)
        left = deadline - time.monotonic()
        if left <= 0:
            return still
        time.sleep(min(pause, left, every))
        pause = min(pause * 2, every)
        waiting = [rec for rec, _ in still]
    return still


def _wait_all_visible(ctx: StepContext, certificate_id: str, waiting: list[_Record]) -> None:
    """Check every record until all are visible (each marked as it is seen), for at most
    ``IN_TASK_VISIBILITY_WINDOW``; then ``Wait`` for the polling interval, or fail past the
    propagation timeout."""
    # (propagation timeout, polling interval) per provider, read once for the whole wait
    limits = {name: provider_for(name).timeout() for name in {rec.provider for rec in waiting}}

    def interval(still: list[tuple[_Record, Any]]) -> float:
        return max((limits[rec.provider][1] for rec, _ in still), default=0.0)

    def judge(still: list[tuple[_Record, Any]]) -> None:
        for rec, result in still:
            timeout = limits[rec.provider][0]
            began = dt.datetime.fromisoformat(rec.presented_at) if rec.presented_at else utcnow()
            if (utcnow() - began).total_seconds() > timeout:
                raise PermanentError(
                    f"TXT record at {rec.fqdn} not visible at every authoritative nameserver "
                    f"after {int(timeout)}s ({result.reason})",
                    reason="dns:not_visible",
                )

    still = _check_in_window(ctx, waiting, interval, judge)
    if still:
        raise Wait(interval(still))


@shared_task(bind=True, base=DnsTask, name="certqueue.dns.present_all", ignore_result=True)
def present_all(self: DnsTask, certificate_id: str, challenge_ids: list[int], _transient: int = 0) -> Any:
    """``(certificate_id, [challenge id, ...])``: present every pending challenge of the order and
    return once every one is visible; chained before ``certqueue.acme.validate``."""
    return self.run_step(_present_all_step, certificate_id, challenge_ids)


def _cleanup_all_step(ctx: StepContext, certificate_id: str, challenge_ids: Sequence[int]) -> dict[str, Any]:
    chs = _challenges(ctx, certificate_id, challenge_ids)
    todo = [
        (
            c.id,
            c.type,
            c.provider or "",
            (c.handle or {}).get("fqdn"),
            c.dns_name or "",
            c.dns_value or "",
            (c.handle or {}).get("data"),
        )
        for c in chs
        if c.status != "cleaned"
    ]
    _end_reads(ctx)
    failed: dict[int, str] = {}
    for ch_id, kind, provider_name, fqdn, name, value, data in todo:
        error: str | None = None
        if kind == "dns-01" and provider_name:
            try:
                provider = provider_for(provider_name)
                # no handle: the present may have happened without its commit; find the name the same way
                provider.cleanup(fqdn or follow_cnames(name, resolver_config()), value, data)
            except PermanentError as exc:  # recorded; the reconciler reports it, nothing else fails
                error = failed[ch_id] = exc.reason
        values: dict[str, Any] = {"error": error} if error else {"status": "cleaned", "cleaned_at": utcnow()}
        ctx.session.execute(update(Challenge).where(Challenge.id == ch_id).values(**values))
        ctx.session.commit()  # each removal recorded before the next provider call
    status = "cleanup_failed" if failed else "cleaned"
    return {"certificate_id": certificate_id, "status": status, "failed": sorted(failed.values())}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.dns.cleanup_all", ignore_result=True)
def cleanup_all(
    self: CertqueueTask, certificate_id: str, challenge_ids: list[int], _transient: int = 0
) -> Any:
    """``(certificate_id, [challenge id, ...])``: remove the order's DNS-01 records (idempotent)."""
    return self.run_step(_cleanup_all_step, certificate_id, challenge_ids)


# --- many certificates in one task: a batch's DNS-01 records ------------------------------------


def _present_batch_step(ctx: StepContext, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Present every pending record of the batch's orders (each committed after its provider
    call), then check them all together for at most ``IN_TASK_VISIBILITY_WINDOW``. The certificates
    whose records are all visible are validated together (one ``certqueue.acme.validate_batch``);
    one whose provider failed, or whose records are not visible yet, goes on alone
    (``present_all`` | ``validate``: it presents only what is left, and waits, retries or fails
    there by the certificate's own policy)."""
    jobs: dict[str, dict[str, Any]] = {}
    wanted: dict[str, set[int]] = {}
    for item in items:
        job, ids = dict(item["job"]), [int(i) for i in item["challenges"]]
        jobs[str(job["certificate_id"])], wanted[str(job["certificate_id"])] = job, set(ids)
    certs = ctx.session.execute(select(Certificate).where(Certificate.id.in_(list(jobs)))).scalars()
    in_pipeline = {c.id for c in certs if states.in_pipeline(c.state, c.work_deadline)}
    live = [cid for cid in jobs if cid in in_pipeline]  # in the batch's order
    all_ids = [i for cid in live for i in wanted[cid]]
    chs = [
        c  # a certificate's own challenges only, and only the ones its item names
        for c in ctx.session.execute(
            select(Challenge).where(Challenge.id.in_(all_ids)).order_by(Challenge.id)
        ).scalars()
        if c.certificate_id in in_pipeline and c.id in wanted[c.certificate_id]
    ]
    pending, waiting = _pending(chs), _presented(chs)
    _end_reads(ctx)
    providers = {n: provider_for(n) for n in {p[2] for p in pending}}  # each built once
    alone: set[str] = set()
    by_cert: dict[str, list[tuple[str, int, str, str, str]]] = {}
    for p in pending:
        by_cert.setdefault(p[0], []).append(p)
    for cid, todo in by_cert.items():
        try:
            waiting.extend(_present(ctx, providers, todo))
        except (SQLAlchemyError, SoftTimeLimitExceeded):
            raise  # the whole batch's trouble: it is retried (what was presented is recorded)
        except Exception as exc:  # noqa: BLE001  (this certificate's provider or CNAME: it goes on alone)
            ctx.session.rollback()
            log.info("dns batch: %s: %s; it goes on alone", cid, classify(exc).reason)
            alone.add(cid)
    waiting = [rec for rec in waiting if rec.certificate_id not in alone]
    every = max((provider_for(n).timeout()[1] for n in {rec.provider for rec in waiting}), default=1.0)
    alone |= {rec.certificate_id for rec, _ in _check_in_window(ctx, waiting, lambda _still: every)}
    ready = [jobs[cid] for cid in live if cid not in alone]
    for cid in live:
        if cid in alone:
            ctx.then(present_then_validate(cid, sorted(wanted[cid])))
    if ready:
        ctx.then(task("certqueue.acme.validate_batch", ready))
    return {"certificates": len(items), "validate": len(ready), "alone": len(alone)}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.dns.present_batch", ignore_result=True)
def present_batch(self: CertqueueTask, items: list[dict[str, Any]], _transient: int = 0) -> Any:
    """``[{"job": {"certificate_id": ..., ...}, "challenges": [id, ...]}, ...]``: the DNS-01 records
    of a batch's new orders, presented and checked together; then one
    ``certqueue.acme.validate_batch`` for the certificates whose records are all visible. The batch
    fails no certificate itself: one that cannot get past here goes on alone (``present_all``,
    whose failure handling is that certificate's); an error of the whole batch (its database)
    retries it, then leaves the certificates to their deadlines."""
    return self.run_step(_present_batch_step, items)


def _cleanup_batch_step(ctx: StepContext, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every item's records removed as ``cleanup_all`` removes one order's (each removal committed
    before the next provider call). A certificate whose provider fails transiently is retried alone
    (``cleanup_all``); the others are done."""
    done = failed = 0
    for item in items:
        cid, ids = str(item["certificate_id"]), [int(i) for i in item["challenges"]]
        try:
            out = _cleanup_all_step(ctx, cid, ids)
        except (SQLAlchemyError, SoftTimeLimitExceeded):
            raise  # the whole batch's trouble: it is retried (what was removed is recorded)
        except Exception as exc:  # noqa: BLE001  (this certificate's provider: it is retried alone)
            ctx.session.rollback()
            log.info("dns cleanup batch: %s: %s; retried alone", cid, classify(exc).reason)
            ctx.then(task("certqueue.dns.cleanup_all", cid, ids))
            continue
        done += 1
        failed += out["status"] == "cleanup_failed"
    return {"certificates": len(items), "cleaned": done - failed, "cleanup_failed": failed}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.dns.cleanup_batch", ignore_result=True)
def cleanup_batch(self: CertqueueTask, items: list[dict[str, Any]], _transient: int = 0) -> Any:
    """``[{"certificate_id": ..., "challenges": [id, ...]}, ...]``: many orders' DNS-01 records
    removed in one task (idempotent)."""
    return self.run_step(_cleanup_batch_step, items)
