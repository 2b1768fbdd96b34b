"""TLS-ALPN-01 challenge tokens (RFC 8737). Owns ``tls_alpn01_tokens``: written when an order's
challenges are presented, removed when it finishes, read by every ``certqueue tlsalpn01`` replica
(``certqueue.tlsalpn01``). HTTP-01 tokens stay in ``http01_tokens`` (the pipeline's own)."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select
from sqlalchemy.orm import Session

from certqueue.models import Challenge, TlsAlpn01Token, utcnow

_TOKENS = cast(Table, TlsAlpn01Token.__table__)


def present_tls_alpn01(
    session: Session, presented: list[tuple[Challenge, str]], expires: dt.datetime
) -> None:
    """Make the challenges answerable by the responders, in the caller's transaction: one
    multi-row INSERT of their tokens. Each challenge has its id (it is written) and its key
    authorization beside it; it is ``presented`` already (``pipeline.build_challenges``)."""
    if not presented:
        return
    now = utcnow()
    session.execute(
        insert(_TOKENS),
        [
            {
                "token": str(ch.token),
                "identifier": ch.identifier,
                "key_authorization": key_authorization,
                "certificate_id": ch.certificate_id,
                "challenge_id": ch.id,
                "created_at": now,
                "expires_at": expires,
            }
            for ch, key_authorization in presented
        ],
    )


def remove_tls_alpn01(session: Session, order_id: int) -> None:
    session.execute(
        delete(TlsAlpn01Token).where(
            TlsAlpn01Token.challenge_id.in_(select(Challenge.id).where(Challenge.order_id == order_id))
        )
    )


def remove_expired(session: Session, now: dt.datetime) -> int:
    result: Any = session.execute(delete(TlsAlpn01Token).where(TlsAlpn01Token.expires_at <= now))
    return int(result.rowcount or 0)
