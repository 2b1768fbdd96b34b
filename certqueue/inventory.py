"""Reading the inventory: one certificate by id, a page of certificates. Owns no state.

Kept apart from ``certqueue.certificates`` (which writes rows, stores issuances and imports the
cryptography stack) so the read commands of the CLI and the API import only the data model.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import String, cast, select
from sqlalchemy.orm import Session

from certqueue import validation
from certqueue.errors import NotFound
from certqueue.models import Certificate


def get(session: Session, certificate_id: str) -> Certificate:
    """The certificate, or NotFound (a malformed id is InvalidInput: nothing is looked up)."""
    validation.validate_certificate_id(certificate_id)
    cert = session.get(Certificate, certificate_id)
    if cert is None:
        raise NotFound(f"no certificate {certificate_id}")
    return cert


def list_certificates(
    session: Session,
    *,
    states_in: Iterable[str] | None = None,
    domain: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Certificate]:
    """A page of certificates, oldest first; ``domain`` keeps those naming it exactly."""
    stmt = select(Certificate).order_by(Certificate.created_at, Certificate.id)
    if states_in:
        stmt = stmt.where(Certificate.state.in_(list(states_in)))
    if not domain:
        return list(session.execute(stmt.offset(offset).limit(limit)).scalars())
    d = domain.lower().rstrip(".")
    # the names are a JSON list: the database narrows by the quoted name, the exact test is here
    # (a page of 100 out of a million rows must not load the million)
    stmt = stmt.where(cast(Certificate.domains, String).like(f'%"{_like_escape(d)}"%', escape="\\"))
    out: list[Certificate] = []
    skipped = 0
    for cert in session.execute(stmt).scalars():
        if d not in cert.domains:
            continue
        if skipped < offset:
            skipped += 1
            continue
        out.append(cert)
        if len(out) >= limit:
            break
    return out


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
