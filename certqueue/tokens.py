"""API bearer tokens: create, list, revoke, verify. Owns the ``api_tokens`` table.

A token is 256 random bits shown once, at creation; the database keeps only its SHA-256 hash. A
slow password hash would buy nothing here: the input is high-entropy, so a fast hash is as strong
and keeps verification cheap on every request. Lookup is by hash (a unique index), so no token
text ever reaches a log, an error message or a repr.

Scopes nest: ``admin`` includes ``write``, which includes ``read``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from certqueue.errors import InvalidInput, NotFound
from certqueue.models import ApiToken, utcnow

SCOPES = ("read", "write", "admin")
#: what each scope grants, itself included
IMPLIED: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"read", "write"}),
    "admin": frozenset({"read", "write", "admin"}),
}
TOKEN_PREFIX = "cqt_"  # noqa: S105  (a prefix, not a secret)
TOKEN_ID_PREFIX = "tok_"  # noqa: S105
MAX_NAME_LENGTH = 128
#: ``last_used_at`` is refreshed at most this often, so reads do not turn into writes
TOUCH_INTERVAL = dt.timedelta(minutes=1)


def hash_token(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def normalize_scopes(scopes: Iterable[str]) -> list[str]:
    """Validate scope names; returns them sorted in the order read, write, admin, without repeats."""
    wanted = list(scopes)
    unknown = sorted({s for s in wanted if s not in SCOPES})
    if unknown:
        raise InvalidInput(
            f"unknown scope(s): {', '.join(map(repr, unknown))}; use {', '.join(SCOPES)}", field="scopes"
        )
    if not wanted:
        raise InvalidInput("a token needs at least one scope", field="scopes")
    return [s for s in SCOPES if s in wanted]


def granted(scopes: Iterable[str]) -> frozenset[str]:
    """Every scope that ``scopes`` grants (admin ⊇ write ⊇ read)."""
    out: set[str] = set()
    for s in scopes:
        out |= IMPLIED.get(s, frozenset())
    return frozenset(out)


def has_scope(token: ApiToken, needed: str) -> bool:
    return needed in granted(token.scopes or [])


def _validate_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not name.strip()
        or len(name) > MAX_NAME_LENGTH
        or any(not ch.isprintable() for ch in name)
    ):
        raise InvalidInput(f"name must be 1 to {MAX_NAME_LENGTH} printable characters", field="name")
    return name.strip()


def create_token(session: Session, name: str, scopes: Iterable[str]) -> tuple[str, str]:
    """Create a token; returns ``(token_id, plaintext)``. The plaintext is never stored: show it once."""
    clean_name = _validate_name(name)
    clean_scopes = normalize_scopes(scopes)
    token_id = TOKEN_ID_PREFIX + secrets.token_hex(8)
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(id=token_id, name=clean_name, token_hash=hash_token(plaintext), scopes=clean_scopes))
    session.flush()
    return token_id, plaintext


def list_tokens(session: Session, *, include_revoked: bool = True) -> list[ApiToken]:
    stmt = select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)
    if not include_revoked:
        stmt = stmt.where(ApiToken.revoked_at.is_(None))
    return list(session.execute(stmt).scalars())


def revoke_token(session: Session, token_id: str) -> ApiToken:
    """Revoke a token (idempotent: revoking twice keeps the first time); NotFound if there is none."""
    tok = session.get(ApiToken, token_id) if isinstance(token_id, str) else None
    if tok is None:
        raise NotFound(f"no API token {token_id!r}")
    if tok.revoked_at is None:
        tok.revoked_at = utcnow()
        session.flush()
    return tok


def verify_token(session: Session, plaintext: str) -> ApiToken | None:
    """The live token for ``plaintext``, or None (unknown, revoked or malformed). Never raises on input."""
    if not isinstance(plaintext, str) or not plaintext.startswith(TOKEN_PREFIX) or len(plaintext) > 256:
        return None
    tok = session.execute(
        select(ApiToken).where(ApiToken.token_hash == hash_token(plaintext))
    ).scalar_one_or_none()
    if tok is None or tok.revoked_at is not None:
        return None
    return tok


def needs_touch(token: ApiToken, now: dt.datetime | None = None) -> bool:
    now = now or utcnow()
    return token.last_used_at is None or now - token.last_used_at >= TOUCH_INTERVAL


def touch(session: Session, token_id: str, now: dt.datetime | None = None) -> None:
    """Record use of a token (one UPDATE; callers rate-limit it with ``needs_touch``)."""
    session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now or utcnow()))
