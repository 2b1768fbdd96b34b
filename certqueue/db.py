"""Engines and sessions, for PostgreSQL (psycopg 3) and the embedded SQLite default.

* One engine per process and URL, re-created after ``fork`` (Celery prefork children must not share
  the parent's connections): ``os.register_at_fork`` drops the cached engines in the child.
* SQLite runs in WAL mode with a busy timeout, and write transactions start with ``BEGIN IMMEDIATE``
  so two workers never deadlock upgrading a read lock; reads are never blocked by a writer.
* ``session_scope()`` commits once at the end or rolls back on error (warehouse's pattern).
* PostgreSQL sessions carry a statement timeout, a lock timeout and a connect timeout
  (``database.*_timeout_seconds``): a stuck query or a lock held by a frozen process fails the
  statement (a retryable database error for the tasks) instead of hanging a worker forever.
* A SQLite database file certqueue creates is mode 0600 (it holds encrypted keys, tokens' hashes
  and the audit log); an existing one readable by others is reported in the log.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import ColumnElement, Engine, create_engine, event, func, select
from sqlalchemy.orm import Session, sessionmaker

from certqueue.config import get_settings
from certqueue.models import Certificate
from certqueue.runtime_layer import sqlite_file

log = logging.getLogger("certqueue.db")
_lock = threading.Lock()
_engines: dict[tuple[str, bool], Engine] = {}
_makers: dict[tuple[str, bool], sessionmaker[Session]] = {}


def _reset_after_fork() -> None:
    global _engines, _makers
    # never close the parent's connections from the child: just forget them
    for eng in _engines.values():
        eng.dispose(close=False)
    _engines = {}
    _makers = {}


os.register_at_fork(after_in_child=_reset_after_fork)


def database_url() -> str:
    return get_settings().database.url


def _ensure_sqlite_dir(url: str) -> None:
    """The folder of a SQLite database, and the file itself created 0600 before SQLite opens it
    (SQLite would create it with the umask's mode, and its -wal and -shm files copy that mode)."""
    path = sqlite_file(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning(
                "SQLite database %s is accessible by group or others (mode %04o): chmod 600 it", path, mode
            )
        return
    os.fchmod(fd, 0o600)  # whatever the umask
    os.close(fd)


def postgres_connect_args(settings: Any) -> dict[str, Any]:
    """psycopg connection arguments carrying the session timeouts (``database.*_timeout_seconds``)."""
    d = settings.database
    options = []
    if d.statement_timeout_seconds:
        options.append(f"-c statement_timeout={int(d.statement_timeout_seconds * 1000)}")
    if d.lock_timeout_seconds:
        options.append(f"-c lock_timeout={int(d.lock_timeout_seconds * 1000)}")
    args: dict[str, Any] = {"connect_timeout": int(d.connect_timeout_seconds)}
    if options:
        args["options"] = " ".join(options)
    return args


def get_engine(url: str | None = None, *, write: bool = True) -> Engine:
    url = url or database_url()
    if not url.startswith("sqlite"):
        write = True  # one engine serves both on PostgreSQL
    key = (url, write)
    eng = _engines.get(key)
    if eng is not None:
        return eng
    with _lock:
        eng = _engines.get(key)
        if eng is None:
            eng = _make_engine(url, write)
            _engines[key] = eng
        return eng


def _make_engine(url: str, write: bool) -> Engine:
    settings = get_settings()
    kwargs: dict[str, Any] = {"echo": settings.database.echo}
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        eng = create_engine(url, **kwargs)

        @event.listens_for(eng, "connect")
        def _sqlite_connect(dbapi_conn: Any, _rec: Any) -> None:
            # let SQLAlchemy, not pysqlite, decide when transactions begin
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(eng, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return eng
    kwargs.update(
        pool_size=settings.database.pool_size,
        # no pre-ping: it was a SELECT 1 round trip (and a PostgreSQL transaction) on every checkout,
        # about half of all transactions per certificate. A connection that died (a server restart)
        # fails its first statement instead; SQLAlchemy then drops every pooled connection as old as
        # it, and the step is retried as a transient database error (certqueue.lifecycle.failure).
        pool_pre_ping=False,
        max_overflow=10,
        connect_args=postgres_connect_args(settings),
    )
    return create_engine(url, **kwargs)


def sessionmaker_for(url: str | None = None, *, write: bool = True) -> sessionmaker[Session]:
    url = url or database_url()
    maker = _makers.get((url, write))
    if maker is None:
        maker = sessionmaker(bind=get_engine(url, write=write), expire_on_commit=False)
        _makers[(url, write)] = maker
    return maker


@contextmanager
def session_scope(url: str | None = None, *, write: bool = True) -> Iterator[Session]:
    """A session that commits once at the end, or rolls back. ``write=False`` for read-only work
    (on SQLite it does not take the write lock)."""
    session = sessionmaker_for(url, write=write)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def lock_certificate(session: Session, certificate_id: str) -> Certificate | None:
    """Load and lock one certificate row for this transaction (SELECT ... FOR UPDATE on PostgreSQL;
    on SQLite the transaction already holds the database's write lock)."""
    # populate_existing: a row locked again after an earlier commit (a step that talked to the CA
    # in between) is read fresh, not taken from the session's identity map
    stmt = (
        select(Certificate).where(Certificate.id == certificate_id).execution_options(populate_existing=True)
    )
    if is_postgres(session):
        # OF certificates: the joined-eager current_issuance is an outer join, and PostgreSQL
        # refuses FOR UPDATE on the nullable side of one
        stmt = stmt.with_for_update(of=Certificate)
    return session.execute(stmt).scalar_one_or_none()


def lock_certificates(session: Session, certificate_ids: list[str]) -> dict[str, Certificate]:
    """``lock_certificate`` for many rows in one statement (a batch's), by id; the rows are locked in
    id order, so two transactions locking overlapping sets wait for each other, never deadlock."""
    if not certificate_ids:
        return {}
    stmt = (
        select(Certificate)
        .where(Certificate.id.in_(certificate_ids))
        .order_by(Certificate.id)
        .execution_options(populate_existing=True)
    )
    if is_postgres(session):
        stmt = stmt.with_for_update(of=Certificate)
    return {c.id: c for c in session.execute(stmt).scalars()}


def dispose_all() -> None:
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()
        _makers.clear()


def epoch_seconds(col: Any, dialect: str) -> ColumnElement[Any]:
    """Seconds since the epoch of a UTCDateTime column, in SQL (naive UTC text on SQLite)."""
    if dialect == "sqlite":
        return (func.julianday(col) - 2440587.5) * 86400.0
    return func.extract("epoch", col)
