"""certqueue.db hardening (issue 13, finding 7): PostgreSQL sessions carry statement, lock and
connect timeouts from the settings; a SQLite database certqueue creates is mode 0600."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from certqueue import db
from certqueue.config import Settings


@pytest.mark.postgres
def test_postgres_sessions_have_statement_and_lock_timeouts(
    pg_url: str, settings_factory: Callable[..., Settings]
) -> None:
    settings_factory(
        database_url=pg_url,
        **{"database.statement_timeout_seconds": 90, "database.lock_timeout_seconds": 1},
    )
    with db.session_scope(write=False) as s:
        assert s.execute(text("SHOW statement_timeout")).scalar_one() == "90s"
        assert s.execute(text("SHOW lock_timeout")).scalar_one() == "1s"
    # a lock held by another session (a frozen worker) fails the statement instead of hanging it
    holder = db.get_engine(pg_url).connect()
    try:
        holder.execute(text("BEGIN"))
        holder.execute(text("LOCK TABLE runtime_settings IN ACCESS EXCLUSIVE MODE"))
        with pytest.raises(OperationalError, match="lock timeout"), db.session_scope() as s:
            s.execute(text("SELECT count(*) FROM runtime_settings"))
    finally:
        holder.rollback()
        holder.close()


def test_a_new_sqlite_database_is_0600_whatever_the_umask(
    tmp_path: Path, settings_factory: Callable[..., Settings]
) -> None:
    path = tmp_path / "var" / "certqueue.db"
    url = f"sqlite:///{path}"
    settings_factory(database_url=url)
    old = os.umask(0o022)
    try:
        with db.session_scope() as s:
            s.execute(text("CREATE TABLE t (x INTEGER)"))
            s.execute(text("INSERT INTO t VALUES (1)"))
        with db.session_scope(write=False) as s:
            assert s.execute(text("SELECT x FROM t")).scalar_one() == 1
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():  # SQLite gives its journal files the database's mode
            assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0, suffix
