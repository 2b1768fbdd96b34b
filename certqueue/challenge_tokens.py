"""TLS-ALPN-01 challenge tokens (RFC 8737). Owns ``tls_alpn01_tokens``: written when an order's
challenges are presented, removed when it finishes, read by every ``certqueue tlsalpn01`` replica
(``certqueue.tlsalpn01``). HTTP-01 tokens stay in ``http01_tokens`` (the pipeline's own)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from certqueue.models import Challenge, TlsAlpn01Token


def present_tls_alpn01(session: Session, ch: Challenge, key_authorization: str, expires: dt.datetime) -> None:
    """Make ``ch`` answerable by the responders (in the caller's transaction; ``ch`` is flushed)."""
    session.add(
        TlsAlpn01Token(
            token=str(ch.token),
            identifier=ch.identifier,
            key_authorization=key_authorization,
            certificate_id=ch.certificate_id,
            challenge_id=ch.id,
            expires_at=expires,
        )
    )
    ch.status = "presented"


def remove_tls_alpn01(session: Session, order_id: int) -> None:
    session.execute(
        delete(TlsAlpn01Token).where(
            TlsAlpn01Token.challenge_id.in_(select(Challenge.id).where(Challenge.order_id == order_id))
        )
    )


def remove_expired(session: Session, now: dt.datetime) -> int:
    result: Any = session.execute(delete(TlsAlpn01Token).where(TlsAlpn01Token.expires_at <= now))
    return int(result.rowcount or 0)
