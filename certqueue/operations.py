"""What every face calls (REST API, CLI, the guide's API, the public tasks): each request with its
preconditions checked once, written as a durable intent in the caller's transaction.

The caller commits, then calls :func:`certqueue.nudge.nudge` (best effort). Nothing here talks to
the broker: a request is accepted when its transaction commits, whatever the broker is doing, and
dispatch relays it. Preconditions a request fails raise ``InvalidInput`` (bad request, 400),
``NotFound`` (404) or ``InvalidTransition`` (the state forbids it, 409), and nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from certqueue import certificates, events, intents, validation
from certqueue.config import Settings, get_settings
from certqueue.errors import InvalidInput, InvalidTransition
from certqueue.models import Certificate, Intent, State, utcnow

#: states a renewal may be asked in (FAILED: issue again)
RENEWABLE = (State.ACTIVE, State.RENEWING, State.ISSUING, State.FAILED)
REVOCABLE = (State.ACTIVE, State.RENEWING)
NOTHING_TO_DEPLOY = (State.REVOKED, State.EXPIRED, State.FAILED)
#: states in which a certificate may be deleted without ``force``
DELETABLE = (State.REVOKED, State.EXPIRED, State.FAILED)


def check_revocation_reason(reason: str, settings: Settings | None = None) -> int:
    """The RFC 5280 code of ``reason``, refused before anything is written when the CA does not
    take it."""
    code = validation.revocation_reason_code(reason)
    accepted = (settings or get_settings()).acme.revocation_reasons
    if reason not in accepted:
        raise InvalidInput(
            f"the CA does not accept revocation reason {reason!r}; accepted: {', '.join(accepted)}",
            field="reason",
        )
    return code


def request_issue(
    session: Session,
    req: certificates.CertificateRequest,
    *,
    actor: str,
    certificate_id: str | None = None,
) -> tuple[Certificate, bool, Intent | None]:
    """A new certificate (REQUESTED) and its issue intent; the live one for the same names when it
    exists (``created`` False, no intent)."""
    cert, created = certificates.create_certificate(session, req, actor=actor, certificate_id=certificate_id)
    if not created:
        return cert, False, None
    return cert, True, intents.record(session, "issue", cert.id, actor=actor)


def request_issue_many(
    session: Session, reqs: Sequence[certificates.CertificateRequest], *, actor: str
) -> list[tuple[Certificate, bool]]:
    """Many certificates in one transaction: one row (or the live one) per request, and one issue
    intent per new row."""
    out = [certificates.create_certificate(session, req, actor=actor) for req in reqs]
    session.flush()
    intents.record_many(session, "issue", [c.id for c, created in out if created], actor=actor)
    return out


def request_renew(
    session: Session, certificate_id: str, *, force: bool = False, reason: str | None = None, actor: str
) -> Intent | None:
    """A renewal intent; None when the certificate is ACTIVE and not due and ``force`` is off."""
    cert = certificates.get(session, certificate_id)
    if cert.external:
        raise InvalidInput(
            f"{cert.id} was imported; renew it where it was issued and import the new one",
            field="certificate_id",
        )
    if cert.state not in RENEWABLE:
        raise InvalidTransition(
            f"{cert.id} is {cert.state}; renewable states: {', '.join(RENEWABLE)}",
            reason="renew:state",
        )
    if cert.state == State.ACTIVE and not force and (cert.renew_at is None or cert.renew_at > utcnow()):
        return None
    params: dict[str, Any] = {"force": bool(force)}
    if reason:
        params["reason"] = reason[:64]
    return intents.record(session, "renew", cert.id, params, actor=actor)


def request_revoke(session: Session, certificate_id: str, *, reason: str, actor: str) -> Intent | None:
    """A revocation intent; None when the certificate is already REVOKED."""
    check_revocation_reason(reason)
    cert = certificates.get(session, certificate_id)
    if cert.state == State.REVOKED:
        return None
    if cert.external:
        raise InvalidInput(
            f"{cert.id} was imported: revoke it through the CA that issued it", field="certificate_id"
        )
    if cert.state not in REVOCABLE or cert.current_issuance_id is None:
        raise InvalidTransition(
            f"{cert.id} is {cert.state}; only an ACTIVE certificate can be revoked", reason="revoke:state"
        )
    intent = intents.record(session, "revoke", cert.id, {"reason": reason}, actor=actor)
    events.record(session, cert.id, "revocation_requested", reason=reason, actor=actor)
    return intent


def request_propagate(
    session: Session,
    certificate_id: str,
    *,
    regions: Sequence[str] = (),
    force: bool = False,
    actor: str,
    settings: Settings | None = None,
) -> tuple[Intent, list[str]]:
    """A propagation intent and the regions it covers."""
    settings = settings or get_settings()
    cert = certificates.get(session, certificate_id)
    known = {r.name for r in settings.multi_region.regions}
    for r in regions:
        if r not in known:
            raise InvalidInput(f"unknown region {r!r}", field="regions")
    if cert.state in NOTHING_TO_DEPLOY or (
        cert.current_issuance_id is None and cert.pending_issuance_id is None
    ):
        raise InvalidTransition(
            f"{cert.id} is {cert.state} and has nothing to deploy", reason="propagate:state"
        )
    wanted = list(regions) or certificates.regions_for(cert, settings)
    if not wanted:
        raise InvalidInput(
            f"{cert.id} has no regions: enable multi_region or give the certificate targets", field="regions"
        )
    params: dict[str, Any] = {}
    if regions:
        params["regions"] = list(regions)
    if force:
        params["force"] = True
    return intents.record(session, "propagate", cert.id, params, actor=actor), wanted


def import_certificate(
    session: Session,
    *,
    certificate_pem: str,
    private_key_pem: str | None,
    chain_pem: str | None = None,
    targets: Sequence[str] = (),
    actor: str,
    settings: Settings | None = None,
) -> tuple[Certificate, Intent | None]:
    """Import an external certificate: ACTIVE at once without regions, else ISSUED with a
    propagation intent (it becomes ACTIVE when its regions hold it)."""
    settings = settings or get_settings()
    cert, iss = certificates.store_external(
        session,
        certificate_pem=certificate_pem,
        private_key_pem=private_key_pem,
        chain_pem=chain_pem,
        targets=targets,
        actor=actor,
        settings=settings,
    )
    # an import with regions is served once they hold it, whatever the strategy: the guide's store
    # waits for exactly that
    _active, intent = certificates.issuance_in_hand(
        session, cert, iss, reason="imported", actor=actor, settings=settings, strategy="sync"
    )
    return cert, intent


def delete_certificate(
    session: Session,
    certificate_id: str,
    *,
    force: bool = False,
    actor: str,
    settings: Settings | None = None,
) -> Intent | None:
    """Remove a certificate from the inventory with its issuances, orders and deployment rows; the
    audit log keeps its events. Only REVOKED, EXPIRED or FAILED ones unless ``force``. Its deployed
    copies are removed from their targets (regions with ``remove_on_delete``, the default) through a
    remove intent recorded first, in the same transaction: it outlives the rows. Returns that intent
    (None when nothing is to be removed)."""
    from certqueue.removals import request_removal

    cert = certificates.get(session, certificate_id)
    if cert.state not in DELETABLE and not force:
        raise InvalidTransition(
            f"{cert.id} is {cert.state}; only {', '.join(DELETABLE)} certificates are deleted without force",
            reason="delete:state",
        )
    cid, was = cert.id, cert.state
    removal = request_removal(session, cid, "delete", actor=actor, settings=settings)
    # the open work of the certificate ends with it; its removal is what is left
    intents.complete(session, cid, ("issue", "renew", "revoke", "propagate"), outcome="deleted")
    session.expunge(cert)
    events.record(
        session, cid, "deleted", actor=actor, reason="forced" if force else None, data={"state": was}
    )
    session.execute(
        delete(Certificate).where(Certificate.id == cid).execution_options(synchronize_session=False)
    )
    return removal


def intent_outcome(session: Session, intent_id: int) -> Intent | None:
    return session.get(Intent, intent_id)
