"""certqueue.api.auth on a small FastAPI app (in-process HTTP through the real routing and
dependencies) against a real database, SQLite and PostgreSQL: 401 and 403 as documented, scopes
nest, and every authenticated request records when its token was last used."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable, Iterator
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.testclient import TestClient
from sqlalchemy import update

from certqueue import tokens
from certqueue.api.auth import REALM, Principal, authenticate, require
from certqueue.config import Settings
from certqueue.db import session_scope
from certqueue.models import ApiToken, utcnow


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/who")
    def who(p: Annotated[Principal, Depends(authenticate)]) -> dict[str, object]:
        return {"id": p.token_id, "actor": p.actor, "scopes": sorted(p.scopes)}

    for scope in tokens.SCOPES:
        # a default, not an annotation: annotations are strings here, evaluated after the loop
        @app.get(f"/{scope}", name=scope)
        def scoped(p: Principal = Depends(require(scope))) -> dict[str, str]:
            return {"ok": p.name}

    return app


@pytest.fixture
def client(db_settings: Settings) -> Iterator[TestClient]:
    with TestClient(_app()) as c:
        yield c


@pytest.fixture
def client_factory() -> Iterator[Callable[[], TestClient]]:
    made: list[TestClient] = []

    def make() -> TestClient:
        c = TestClient(_app())
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _token(scopes: list[str], name: str = "t") -> tuple[str, str]:
    with session_scope() as s:
        return tokens.create_token(s, name, scopes)


def _last_used(token_id: str) -> dt.datetime | None:
    with session_scope(write=False) as s:
        row = s.get(ApiToken, token_id)
        assert row is not None
        return row.last_used_at


def _bearer(plaintext: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {plaintext}"}


def test_no_token_is_401_with_the_realm(client: TestClient) -> None:
    r = client.get("/who")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == REALM
    assert r.json() == {"detail": "a bearer token is required"}
    assert client.get("/who", headers={"Authorization": "Basic dXNlcjpwdw=="}).status_code == 401
    assert client.get("/who", headers={"Authorization": "Bearer "}).status_code == 401


def test_unknown_or_revoked_token_is_401_invalid_token_and_never_echoed(client: TestClient) -> None:
    token_id, plaintext = _token(["admin"])
    unknown = tokens.TOKEN_PREFIX + "x" * 43
    r = client.get("/who", headers=_bearer(unknown))
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == REALM + ', error="invalid_token"'
    assert r.json() == {"detail": "the token is unknown or revoked"}
    assert unknown not in r.text
    with session_scope() as s:
        tokens.revoke_token(s, token_id)
    r = client.get("/who", headers=_bearer(plaintext))
    assert r.status_code == 401 and plaintext not in r.text
    assert _last_used(token_id) is None  # a refused token is not "used"


def test_a_valid_token_names_its_principal(client: TestClient) -> None:
    token_id, plaintext = _token(["write"], name="deployer")
    r = client.get("/who", headers=_bearer(plaintext))
    assert r.status_code == 200
    assert r.json() == {"id": token_id, "actor": "api:deployer", "scopes": ["read", "write"]}
    assert plaintext not in r.text


def test_using_a_token_records_last_used_at(client: TestClient) -> None:
    token_id, plaintext = _token(["read"])
    assert _last_used(token_id) is None
    before = utcnow()
    assert client.get("/who", headers=_bearer(plaintext)).status_code == 200
    first = _last_used(token_id)
    assert first is not None and before - dt.timedelta(seconds=1) <= first <= utcnow()

    # within TOUCH_INTERVAL a read stays a read: the time is not rewritten
    assert client.get("/read", headers=_bearer(plaintext)).status_code == 200
    assert _last_used(token_id) == first

    # once the interval has passed, the next request records the new time
    stale = utcnow() - tokens.TOUCH_INTERVAL - dt.timedelta(seconds=5)
    with session_scope() as s:
        s.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=stale))
    assert client.get("/read", headers=_bearer(plaintext)).status_code == 200
    again = _last_used(token_id)
    assert again is not None and again > stale + tokens.TOUCH_INTERVAL


@pytest.mark.parametrize(
    ("scopes", "allowed"),
    [
        (["read"], {"read"}),
        (["write"], {"read", "write"}),
        (["admin"], {"read", "write", "admin"}),
    ],
)
def test_scopes_nest_and_a_missing_scope_is_403(
    client: TestClient, scopes: list[str], allowed: set[str]
) -> None:
    _, plaintext = _token(scopes, name="scoped")
    for scope in tokens.SCOPES:
        r = client.get(f"/{scope}", headers=_bearer(plaintext))
        if scope in allowed:
            assert (r.status_code, r.json()) == (200, {"ok": "scoped"})
        else:
            assert r.status_code == 403
            assert r.json()["detail"] == f"this token lacks the {scope!r} scope"


def test_require_refuses_an_unknown_scope() -> None:
    with pytest.raises(ValueError, match="unknown scope 'root'"):
        require("root")
    assert require("write").__name__ == "require_write"


def test_principal_actor_is_bounded() -> None:
    p = Principal(token_id="tok_1", name="n" * 200, scopes=frozenset({"read"}))
    assert p.actor == ("api:" + "n" * 200)[:128] and len(p.actor) == 128
    assert p.can("read") and not p.can("write")


@pytest.mark.parametrize(
    "credentials",
    [
        None,
        HTTPAuthorizationCredentials(scheme="Basic", credentials="x"),
        HTTPAuthorizationCredentials(scheme="Bearer", credentials=""),
    ],
)
def test_authenticate_itself_refuses_what_is_not_a_bearer_token(
    db_settings: Settings, credentials: HTTPAuthorizationCredentials | None
) -> None:
    """The check does not rely on FastAPI's HTTPBearer having filtered the header first."""
    _, plaintext = _token(["admin"])
    if credentials is not None and credentials.credentials == "x":
        credentials = HTTPAuthorizationCredentials(scheme="Basic", credentials=plaintext)  # a valid token
    with pytest.raises(HTTPException) as info:
        authenticate(credentials)
    assert info.value.status_code == 401 and info.value.detail == "a bearer token is required"


def test_checking_a_token_takes_no_write_lock(
    sqlite_url: str, settings_factory: Callable[..., Settings], client_factory: Callable[[], TestClient]
) -> None:
    """On SQLite a token check is a read: it answers while another process holds the write lock
    (a worker committing), instead of queueing behind it. Only a stale ``last_used_at`` writes."""
    settings_factory(database_url=sqlite_url)
    token_id, plaintext = _token(["read"])
    with session_scope() as s:  # fresh last_used_at: this request needs no write at all
        s.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=utcnow()))
    client = client_factory()
    writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=1)
    try:
        writer.execute("BEGIN IMMEDIATE")  # the database's write lock, held
        r = client.get("/who", headers=_bearer(plaintext))
        assert r.status_code == 200, r.text
    finally:
        writer.rollback()
        writer.close()


def test_a_token_longer_than_any_issued_is_refused_before_any_lookup(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to 256 characters a token is looked up (and, unknown, refused); a longer one is refused
    the same way, as invalid_token, without hashing it or asking the database."""
    looked_up: list[int] = []
    real = tokens.verify_token

    def verify(session: object, plaintext: str) -> object:
        looked_up.append(len(plaintext))
        return real(session, plaintext)  # type: ignore[arg-type]

    monkeypatch.setattr(tokens, "verify_token", verify)
    for length in (256, 257):
        r = client.get("/who", headers=_bearer("x" * length))
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == REALM + ', error="invalid_token"'
        assert r.json() == {"detail": "the token is unknown or revoked"}
    assert looked_up == [256]
