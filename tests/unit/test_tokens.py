"""API tokens against a real (temporary SQLite) database: hashing, scopes, revocation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select

from certqueue import migrate, tokens
from certqueue.config import load_settings, set_settings
from certqueue.db import dispose_all, session_scope
from certqueue.errors import InvalidInput, NotFound
from certqueue.models import ApiToken


@pytest.fixture()
def db(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    set_settings(load_settings(overrides={"database.url": url}, directory=tmp_path, environ={}).settings)
    migrate.upgrade(url)
    yield url
    dispose_all()
    set_settings(None)


def test_create_stores_only_the_hash_and_verify_finds_it(db: str) -> None:
    with session_scope() as s:
        token_id, plaintext = tokens.create_token(s, "deployer", ["write"])
    assert plaintext.startswith("cqt_") and len(plaintext) > 40
    with session_scope(write=False) as s:
        row = s.get(ApiToken, token_id)
        assert row is not None
        assert row.token_hash == hashlib.sha256(plaintext.encode()).hexdigest()
        # the plaintext is stored nowhere in the row
        assert all(plaintext not in str(getattr(row, c.key)) for c in ApiToken.__table__.columns)
        assert plaintext not in repr(row)
        found = tokens.verify_token(s, plaintext)
        assert found is not None and found.id == token_id
        assert tokens.verify_token(s, plaintext + "x") is None
        assert tokens.verify_token(s, "cqt_" + "A" * 43) is None
        assert tokens.verify_token(s, "") is None
        assert tokens.verify_token(s, None) is None  # type: ignore[arg-type]


def test_two_tokens_differ(db: str) -> None:
    with session_scope() as s:
        a = tokens.create_token(s, "a", ["read"])
        b = tokens.create_token(s, "a", ["read"])
    assert a[0] != b[0] and a[1] != b[1]


@pytest.mark.parametrize(
    ("scopes", "read", "write", "admin"),
    [
        (["read"], True, False, False),
        (["write"], True, True, False),
        (["admin"], True, True, True),
        (["read", "admin"], True, True, True),
    ],
)
def test_scopes_nest(db: str, scopes: list[str], read: bool, write: bool, admin: bool) -> None:
    with session_scope() as s:
        _, plaintext = tokens.create_token(s, "t", scopes)
    with session_scope(write=False) as s:
        tok = tokens.verify_token(s, plaintext)
        assert tok is not None
        assert (
            tokens.has_scope(tok, "read"),
            tokens.has_scope(tok, "write"),
            tokens.has_scope(tok, "admin"),
        ) == (read, write, admin)


@pytest.mark.parametrize(
    ("name", "scopes", "field"),
    [
        ("x", ["root"], "scopes"),
        ("x", [], "scopes"),
        ("", ["read"], "name"),
        ("bad\nname", ["read"], "name"),
        ("n" * 129, ["read"], "name"),
    ],
)
def test_bad_input_writes_nothing(db: str, name: str, scopes: list[str], field: str) -> None:
    with pytest.raises(InvalidInput) as err, session_scope() as s:
        tokens.create_token(s, name, scopes)
    assert err.value.field == field
    with session_scope(write=False) as s:
        assert s.execute(select(ApiToken)).first() is None


def test_revoke_and_list(db: str) -> None:
    with session_scope() as s:
        keep_id, _ = tokens.create_token(s, "keep", ["read"])
        gone_id, gone = tokens.create_token(s, "gone", ["admin"])
    with session_scope() as s:
        first = tokens.revoke_token(s, gone_id).revoked_at
    with session_scope() as s:
        assert tokens.revoke_token(s, gone_id).revoked_at == first  # idempotent
        with pytest.raises(NotFound):
            tokens.revoke_token(s, "tok_missing")
    with session_scope(write=False) as s:
        assert tokens.verify_token(s, gone) is None
        assert [t.id for t in tokens.list_tokens(s)] == [keep_id, gone_id]
        assert [t.id for t in tokens.list_tokens(s, include_revoked=False)] == [keep_id]


def test_touch_is_rate_limited(db: str) -> None:
    with session_scope() as s:
        token_id, plaintext = tokens.create_token(s, "t", ["read"])
    with session_scope(write=False) as s:
        tok = tokens.verify_token(s, plaintext)
        assert tok is not None and tokens.needs_touch(tok)
    with session_scope() as s:
        tokens.touch(s, token_id)
    with session_scope(write=False) as s:
        tok = tokens.verify_token(s, plaintext)
        assert tok is not None and tok.last_used_at is not None
        assert not tokens.needs_touch(tok)
        assert tokens.needs_touch(tok, tok.last_used_at + tokens.TOUCH_INTERVAL)
