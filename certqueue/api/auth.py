"""Bearer-token authentication and scope checks for the REST API.

``Authorization: Bearer <token>``. No or unknown token: 401 with ``WWW-Authenticate``; a valid token
without the scope an endpoint needs: 403. Reads need ``read``, writes ``write``, force-deletion
``admin`` (admin ⊇ write ⊇ read). The token text is never logged or echoed back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from certqueue import tokens
from certqueue.db import session_scope

bearer = HTTPBearer(auto_error=False, description="An API token (certqueue tokens create)")

REALM = 'Bearer realm="certqueue"'
#: longer than any token certqueue issues: refused before hashing or a database lookup
MAX_TOKEN_LENGTH = 256


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and granted scopes."""

    token_id: str
    name: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        return f"api:{self.name}"[:128]

    def can(self, scope: str) -> bool:
        return scope in self.scopes


def _unauthorized(detail: str, error: str | None = None) -> HTTPException:
    header = REALM + (f', error="{error}"' if error else "")
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": header})


def authenticate(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("a bearer token is required")
    if len(credentials.credentials) > MAX_TOKEN_LENGTH:
        raise _unauthorized("the token is unknown or revoked", error="invalid_token")
    with session_scope(write=False) as session:
        tok = tokens.verify_token(session, credentials.credentials)
        if tok is None:
            raise _unauthorized("the token is unknown or revoked", error="invalid_token")
        principal = Principal(token_id=tok.id, name=tok.name, scopes=tokens.granted(tok.scopes or []))
        stale = tokens.needs_touch(tok)
    if stale:
        with session_scope() as session:
            tokens.touch(session, principal.token_id)
    return principal


def require(scope: str) -> Callable[..., Principal]:
    """A dependency that authenticates and checks ``scope``."""
    if scope not in tokens.SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def dependency(principal: Principal = Depends(authenticate)) -> Principal:
        if not principal.can(scope):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"this token lacks the {scope!r} scope")
        return principal

    dependency.__name__ = f"require_{scope}"
    return dependency
