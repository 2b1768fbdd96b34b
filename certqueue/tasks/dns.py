"""The ``dns`` pool: DNS-01 present, wait until visible at every authoritative nameserver, clean up.

Owns the DNS side of ``challenges`` rows (provider, handle, presented/visible/cleaned). The
provider's handle is stored in the row, so any worker can clean up. Waiting for visibility is a
retry with the provider's polling interval as countdown, until its propagation timeout; then the
certificate's order fails with the stable reason ``dns:not_visible`` and the record is removed.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from certqueue import events
from certqueue.config import get_settings
from certqueue.dns.base import DNSProvider
from certqueue.dns.propagation import check_visible
from certqueue.dns.zones import Resolver, follow_cnames
from certqueue.errors import CertqueueError, PermanentError
from certqueue.lifecycle import states
from certqueue.models import Certificate, Challenge, utcnow
from certqueue.tasks.base import CertqueueTask, StepContext, Wait
from certqueue.tasks.pipeline import PipelineTask

log = logging.getLogger("certqueue.dns")


def resolver_config() -> Resolver:
    c = get_settings().challenges
    return Resolver(nameservers=tuple(c.dns_resolvers), nameserver_port=c.nameserver_port)


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
        import datetime as dt

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
