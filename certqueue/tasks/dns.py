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
certificates whose records are all visible and the others on alone (``present_all`` | validate).
A batch whose records are in several zones (by provider and registered domain) is a chord instead:
one ``certqueue.dns.present_zone`` per zone, side by side on the dns pool, each reporting which
certificates are ready; its body ``certqueue.dns.presented_batch`` sends the validate batch;
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

from celery import chord, shared_task
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


def _zone_of(name: str) -> str:
    """The zone a record is grouped by: the registered domain of its name (public suffix list). A
    zone delegated below it, or a CNAME into another zone, only makes a group coarser: the groups
    decide what runs side by side, never what is presented."""
    from certqueue.validation import public_suffixes

    base = name.lower().rstrip(".").removeprefix("_acme-challenge.").removeprefix("*.")
    return str(public_suffixes().privatesuffix(base) or base)


def _by_zone(ctx: StepContext, items: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The batch's items split by (provider, zone) of their records (one SELECT): a certificate with
    records in two zones is in both groups, each with its records there. A certificate none of whose
    records is found goes with the first group (which then finds nothing to present for it)."""
    wanted = {str(it["job"]["certificate_id"]): [int(i) for i in it["challenges"]] for it in items}
    all_ids = [i for ids in wanted.values() for i in ids]
    rows = ctx.session.execute(
        select(Challenge.id, Challenge.certificate_id, Challenge.provider, Challenge.dns_name).where(
            Challenge.id.in_(all_ids)
        )
    ).tuples()
    zone: dict[int, tuple[str, str]] = {}
    for ch_id, cid, provider, name in rows:
        if ch_id in wanted.get(cid, ()):
            zone[ch_id] = (provider or "", _zone_of(name or ""))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    homeless: list[dict[str, Any]] = []
    for it in items:
        cid = str(it["job"]["certificate_id"])
        mine: dict[tuple[str, str], list[int]] = {}
        for ch_id in wanted[cid]:
            if ch_id in zone:
                mine.setdefault(zone[ch_id], []).append(ch_id)
        if not mine:
            homeless.append({"job": it["job"], "challenges": wanted[cid]})
        for key, ids in mine.items():
            groups.setdefault(key, []).append({"job": it["job"], "challenges": ids})
    out = [groups[key] for key in sorted(groups)]
    if homeless:
        out = [homeless + out[0], *out[1:]] if out else [homeless]
    return out


def _present_batch_step(ctx: StepContext, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch's records in one zone (and one provider): presented and checked here, then one
    ``certqueue.acme.validate_batch`` (``_present_together``). In several: this task replaces
    itself with a chord, one ``certqueue.dns.present_zone`` per zone side by side on the dns pool,
    whose body (``certqueue.dns.presented_batch``) sends the one validate batch once all answered."""
    groups = _by_zone(ctx, items)
    if len(groups) > 1:
        _end_reads(ctx)
        header = [present_zone.si(group) for group in groups]
        ctx.replace(chord(header, presented_batch.s(list(items))))
        return {"certificates": len(items), "zones": len(groups)}
    ready, alone, _gone, jobs, wanted = _present_together(ctx, items)
    return _send_on(ctx, items, ready, alone, jobs, wanted)


def _send_on(
    ctx: StepContext,
    items: Sequence[dict[str, Any]],
    ready: list[str],
    alone: set[str],
    jobs: dict[str, dict[str, Any]],
    wanted: dict[str, set[int]],
) -> dict[str, Any]:
    """One validate batch for the ready certificates; each one left alone to ``present_all`` |
    ``validate`` (it presents only what is left, and waits, retries or fails by its own policy)."""
    for cid in jobs:
        if cid in alone:
            ctx.then(present_then_validate(cid, sorted(wanted[cid])))
    if ready:
        ctx.then(task("certqueue.acme.validate_batch", [jobs[cid] for cid in ready]))
    return {"certificates": len(items), "validate": len(ready), "alone": len(alone)}


def _present_together(
    ctx: StepContext, items: Sequence[dict[str, Any]]
) -> tuple[list[str], set[str], set[str], dict[str, dict[str, Any]], dict[str, set[int]]]:
    """Present every pending record of the items' orders (each committed after its provider call),
    then check them all together for at most ``IN_TASK_VISIBILITY_WINDOW``. Returns the certificates
    whose records are all visible (in the items' order), those whose provider failed or whose
    records are not visible yet (to go on alone), those no longer being issued, and each
    certificate's job and challenge ids."""
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
    ready = [cid for cid in live if cid not in alone]
    gone = set(jobs) - set(live)
    live_jobs = {cid: jobs[cid] for cid in live}
    return ready, alone, gone, live_jobs, wanted


@shared_task(bind=True, base=CertqueueTask, name="certqueue.dns.present_batch", ignore_result=True)
def present_batch(self: CertqueueTask, items: list[dict[str, Any]], _transient: int = 0) -> Any:
    """``[{"job": {"certificate_id": ..., ...}, "challenges": [id, ...]}, ...]``: the DNS-01 records
    of a batch's new orders, presented and checked together; then one
    ``certqueue.acme.validate_batch`` for the certificates whose records are all visible. The batch
    fails no certificate itself: one that cannot get past here goes on alone (``present_all``,
    whose failure handling is that certificate's); an error of the whole batch (its database)
    retries it, then leaves the certificates to their deadlines."""
    return self.run_step(_present_batch_step, items)


def _present_zone_step(ctx: StepContext, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ready, alone, gone, _jobs, _wanted = _present_together(ctx, items)
    return {"ready": ready, "alone": sorted(alone), "gone": sorted(gone)}


@shared_task(bind=True, base=CertqueueTask, name="certqueue.dns.present_zone")
def present_zone(self: CertqueueTask, items: list[dict[str, Any]], _transient: int = 0) -> Any:
    """A chord header of ``present_batch``: the items' records in one zone presented and checked
    together; returns which certificates are ready, which go on alone and which are gone (the
    body decides: a certificate is ready when every zone of its records says so). Sends nothing."""
    return self.run_step(_present_zone_step, items)


def _presented_batch_step(ctx: StepContext, results: Any, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The chord body: a certificate is validated with the batch when every zone that holds its
    records found them visible; one that any zone left alone, or whose zone's answer is missing
    (its task backed off), goes on alone; one that is no longer being issued is left."""
    answers = [r for r in (results if isinstance(results, list) else []) if isinstance(r, dict)]
    ready_in: dict[str, int] = {}
    alone: set[str] = set()
    gone: set[str] = set()
    for r in answers:
        for cid in r.get("ready") or ():
            ready_in[str(cid)] = ready_in.get(str(cid), 0) + 1
        alone |= {str(c) for c in r.get("alone") or ()}
        gone |= {str(c) for c in r.get("gone") or ()}
    groups = {str(it["job"]["certificate_id"]): 0 for it in items}
    for group in _by_zone(ctx, items):
        for it in group:
            groups[str(it["job"]["certificate_id"])] += 1
    jobs: dict[str, dict[str, Any]] = {}
    wanted: dict[str, set[int]] = {}
    ready: list[str] = []
    for it in items:
        cid = str(it["job"]["certificate_id"])
        if cid in gone or cid in jobs:
            continue
        jobs[cid], wanted[cid] = dict(it["job"]), {int(i) for i in it["challenges"]}
        if cid not in alone and ready_in.get(cid, 0) >= groups[cid]:
            ready.append(cid)
        else:
            alone.add(cid)
    _end_reads(ctx)
    return _send_on(ctx, items, ready, alone & set(jobs), jobs, wanted)


@shared_task(bind=True, base=CertqueueTask, name="certqueue.dns.presented_batch", ignore_result=True)
def presented_batch(
    self: CertqueueTask, results: Any, items: list[dict[str, Any]], _transient: int = 0
) -> Any:
    """The body of ``present_batch``'s chord: ``results`` are its ``present_zone`` answers, ``items``
    the batch's; one ``certqueue.acme.validate_batch`` for the certificates ready in every zone."""
    return self.run_step(_presented_batch_step, results, items)


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
