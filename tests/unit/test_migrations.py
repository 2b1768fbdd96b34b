"""certqueue.migrate and certqueue.db against real SQLite files and a real PostgreSQL.

* upgrade on an empty database creates every table of the models, and the schema it creates is the
  models' (Alembic's autogenerate comparison finds nothing to change);
* upgrade twice is a no-op; so is ``certqueue db upgrade`` run twice through the CLI;
* the due-renewal scan is an index range scan on PostgreSQL at 20k rows;
* engines are per process: a forked child gets its own connection, the parent's still works.
"""

from __future__ import annotations

import datetime as dt
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import insert, inspect, text

from certqueue import db, migrate
from certqueue.cli import main
from certqueue.config import Settings
from certqueue.models import Base, Certificate, State
from tests.conftest_db import backend_of

DUE_SCAN = (
    "SELECT id FROM certificates WHERE state='ACTIVE' AND renew_at <= now() ORDER BY renew_at LIMIT 500"
)


def _tables(url: str) -> set[str]:
    return set(inspect(db.get_engine(url)).get_table_names())


def test_upgrade_creates_every_table_and_is_idempotent(
    empty_db_url: str, settings_factory: Callable[..., Settings]
) -> None:
    settings_factory(database_url=empty_db_url)
    assert migrate.current_revision(empty_db_url) is None
    assert not _tables(empty_db_url) & set(Base.metadata.tables)

    head = migrate.head_revision()
    assert head is not None
    assert migrate.upgrade(empty_db_url) == head
    tables = _tables(empty_db_url)
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables

    # twice: same revision, no error, nothing dropped or duplicated
    assert migrate.upgrade(empty_db_url) == head
    assert _tables(empty_db_url) == tables
    with db.get_engine(empty_db_url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1


def test_downgrade_to_base_and_up_again(empty_db_url: str, settings_factory: Callable[..., Settings]) -> None:
    settings_factory(database_url=empty_db_url)
    migrate.upgrade(empty_db_url)
    engine = db.get_engine(empty_db_url)
    with engine.begin() as conn:
        cfg = migrate.alembic_config(empty_db_url)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert not _tables(empty_db_url) & set(Base.metadata.tables)
    assert migrate.upgrade(empty_db_url) == migrate.head_revision()
    assert set(Base.metadata.tables) <= _tables(empty_db_url)


def test_migrated_schema_matches_the_models(db_url: str, db_settings: Settings) -> None:
    """A model change without a migration shows up here (what ``alembic revision --autogenerate``
    would write must be nothing)."""
    with db.get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_due_scan_index_exists(db_url: str, db_settings: Settings) -> None:
    indexes = {ix["name"]: ix for ix in inspect(db.get_engine(db_url)).get_indexes("certificates")}
    assert "ix_certificates_state_renew_at" in indexes
    assert indexes["ix_certificates_state_renew_at"]["column_names"] == ["state", "renew_at"]
    # the partial unique index that de-duplicates live requests
    assert indexes["uq_certificates_live_dedupe"]["unique"]


@pytest.mark.postgres
def test_due_scan_is_an_index_scan_on_postgres(
    pg_url: str, settings_factory: Callable[..., Settings]
) -> None:
    settings_factory(database_url=pg_url)
    engine = db.get_engine(pg_url)
    now = dt.datetime.now(dt.UTC)
    rng = random.Random(7)
    states = [State.ACTIVE] * 8 + [State.RENEWING, State.EXPIRED, State.FAILED, State.REVOKED]
    rows = [
        {
            "id": f"cert_explain{i:012d}",
            "domains": [f"h{i}.example.com"],
            "dedupe_key": f"{i:064x}",
            "state": rng.choice(states),
            "key_type": "ec256",
            "challenge_type": "http-01",
            "challenge_map": {},
            "directory_url": "https://acme.example/dir",
            "targets": [],
            "renew_at": now + dt.timedelta(minutes=rng.randint(-60 * 24 * 10, 60 * 24 * 90)),
            "created_at": now,
            "updated_at": now,
        }
        for i in range(20_000)
    ]
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE certificates CASCADE"))
        conn.execute(insert(Certificate), rows)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE certificates"))
        plan = "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + DUE_SCAN)))
        due = conn.execute(text(DUE_SCAN)).scalars().all()
    assert "Index" in plan, plan
    assert "ix_certificates_state_renew_at" in plan, plan
    assert "Seq Scan" not in plan, plan
    assert len(due) == 500  # ~8% of 16k ACTIVE rows are past due: the query is real, not empty


def test_cli_db_upgrade_twice(
    empty_db_url: str, tmp_path: Path, settings_factory: Callable[..., Settings]
) -> None:
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    runner = CliRunner()
    env = {"CERTQUEUE_SETTINGS_DIR": str(settings_dir)}
    for _ in range(2):
        result = runner.invoke(main, ["--database", empty_db_url, "db", "upgrade"], env=env)
        assert result.exit_code == 0, result.output
        assert f"database at revision {migrate.head_revision()}" in result.output
    settings_factory(database_url=empty_db_url)
    assert set(Base.metadata.tables) <= _tables(empty_db_url)


def test_engines_are_recreated_after_fork(db_url: str, db_settings: Settings) -> None:
    """A Celery prefork child must not share the parent's connections (os.register_at_fork)."""
    pid_sql = "SELECT pg_backend_pid()" if backend_of(db_url) == "postgres" else "SELECT 1"
    parent_engine = db.get_engine()
    with db.session_scope() as s:
        parent_conn_id = s.execute(text(pid_sql)).scalar_one()
    assert parent_engine.pool.checkedin() >= 1  # a pooled connection a careless child could reuse

    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status and the pipe
        code = 1
        try:
            os.close(read_fd)
            engine = db.get_engine()
            with db.session_scope() as s:
                child_conn_id = s.execute(text(pid_sql)).scalar_one()
                s.execute(text("SELECT count(*) FROM certificates")).scalar_one()
            fresh = engine is not parent_engine
            os.write(write_fd, f"{fresh} {child_conn_id}".encode())
            code = 0 if fresh else 2
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    fresh, child_conn_id = report.split()
    assert fresh == "True"
    if backend_of(db_url) == "postgres":
        assert int(child_conn_id) != parent_conn_id  # a new server connection, not the parent's

    # the parent's engine (and its pooled connection) still works
    assert db.get_engine() is parent_engine
    with db.session_scope() as s:
        assert s.execute(text(pid_sql)).scalar_one() == parent_conn_id
        assert s.execute(text("SELECT count(*) FROM certificates")).scalar_one() == 0
