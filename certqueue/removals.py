"""Removing deployed copies of a revoked or deleted certificate (``Target.remove``), as a durable
intent. Owns the ``remove`` intents' parameters; the work is done by ``certqueue.tasks.removal``.

What to remove is written down when the request is made, in the same transaction: the region, its
provider and the remote reference of every copy that is deployed and whose region says so
(``remove_on_revoke`` / ``remove_on_delete``, both on by default). The intent carries them, so a
deleted certificate (its deployment rows are gone with it) is still cleaned up, by whichever worker,
after any restart. The decision of which regions and when to retry is
``certqueue.lifecycle.removal``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from certqueue import intents
from certqueue.config import Settings, get_settings
from certqueue.lifecycle.removal import DeployedCopy, copies_to_remove
from certqueue.models import Deployment, Intent


def deployed_copies(session: Session, certificate_id: str) -> list[DeployedCopy]:
    return [
        DeployedCopy(region=d.region, provider=d.provider, ref=d.remote_ref, status=d.status)
        for d in session.execute(
            select(Deployment).where(Deployment.certificate_id == certificate_id).order_by(Deployment.region)
        ).scalars()
    ]


def request_removal(
    session: Session,
    certificate_id: str,
    why: str,
    *,
    actor: str,
    settings: Settings | None = None,
) -> Intent | None:
    """Record the removal of the certificate's deployed copies because it was revoked or deleted
    (``why``: ``revoke`` | ``delete``); None when no region asks for it or nothing is deployed."""
    settings = settings or get_settings()
    policy = {
        r.name: (r.remove_on_revoke if why == "revoke" else r.remove_on_delete)
        for r in settings.multi_region.regions
    }
    todo = copies_to_remove(deployed_copies(session, certificate_id), policy, why)
    if not todo:
        return None
    targets: dict[str, Any] = {c.region: {"provider": c.provider, "ref": c.ref, "attempts": 0} for c in todo}
    existing = [i for i in intents.open_intents(session, certificate_id) if i.kind == "remove"]
    if existing:
        # a revocation's removal still open when the certificate is deleted: one intent for both
        merged = dict((existing[0].params or {}).get("targets") or {})
        for region, entry in targets.items():
            merged.setdefault(region, entry)
        targets = merged
    return intents.record(session, "remove", certificate_id, {"why": why, "targets": targets}, actor=actor)
