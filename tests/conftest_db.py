"""pytest fixtures for the database: a migrated SQLite file, a real PostgreSQL, settings per test.

A plugin module: register it with ``pytest_plugins = ["tests.conftest_db"]`` (tests/conftest.py does).

* ``sqlite_url`` (function): a temp-file SQLite database, migrated with ``certqueue.migrate.upgrade``.
* ``pg_url`` (session): a fresh PostgreSQL database ``certqueue_t_<random>`` on 127.0.0.1:5432 (user
  ``postgres``, trust auth), migrated, dropped at the end of the session. If PostgreSQL cannot be
  reached the tests using it are skipped, unless ``CERTQUEUE_REQUIRE_POSTGRES`` is set (CI): then
  they fail.
* ``db_url`` (function): parametrized over ``sqlite`` and ``postgres``; every test starts with empty
  tables (SQLite: a fresh file; PostgreSQL: the session database, truncated).
* ``empty_db_url`` (function): parametrized the same way, but NOT migrated (a new empty database).
* ``key_file`` (function): a new master key file (``certqueue.keystore.generate_key_file``).
* ``settings_factory`` (function): ``settings_factory(database_url=None, **overrides) -> Settings``
  builds settings from the model defaults plus ``overrides`` (nested or dotted keys; no settings
  files, no environment), with the key file above, installs them with ``set_settings``; engines and
  key stores are reset before, after each call, and at teardown.
* ``db_settings`` (function): ``settings_factory(database_url=db_url)``, for tests that just need
  both.

Helpers for tests: ``make_cert_pem(...)`` (a self-signed leaf and its key) and ``count_rows(table)``.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select, text

from certqueue import certificates, config, db, migrate
from certqueue.config import Settings, load_settings, set_settings
from certqueue.keystore import generate_key_file
from certqueue.models import Base

PG_HOST = "127.0.0.1"
#: another server than the machine's (say, a private one with more connections): CERTQUEUE_TEST_PG_PORT
PG_PORT = int(os.environ.get("CERTQUEUE_TEST_PG_PORT", "5432"))
PG_USER = "postgres"
REQUIRE_POSTGRES_ENV = "CERTQUEUE_REQUIRE_POSTGRES"

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


# --- settings -----------------------------------------------------------------------------------


def _reset_process_state() -> None:
    db.dispose_all()
    certificates.forget_keystores()


def build_settings(tmp_dir: Path, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from the model defaults and ``overrides`` only: an empty settings directory, no
    environment (so the developer's CERTQUEUE_* variables and settings/ files cannot leak in)."""
    empty = tmp_dir / "settings-empty"
    empty.mkdir(exist_ok=True)
    return load_settings(overrides=overrides or {}, directory=empty, environ={}).settings


def _with_settings(tmp_dir: Path, url: str, action: Callable[[], Any]) -> Any:
    """Run ``action`` with settings for ``url`` installed, then put back whatever was installed."""
    previous = config._cached
    set_settings(build_settings(tmp_dir, {"database.url": url}))
    try:
        return action()
    finally:
        db.dispose_all()
        config._cached = previous


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "master.key"
    generate_key_file(path)
    return path


@pytest.fixture
def settings_factory(tmp_path: Path, key_file: Path) -> Iterator[Callable[..., Settings]]:
    _reset_process_state()

    def make(database_url: str | None = None, **overrides: Any) -> Settings:
        merged: dict[str, Any] = {"storage.encryption_key_path": str(key_file)}
        if database_url is not None:
            merged["database.url"] = database_url
        merged.update(overrides)
        settings = build_settings(tmp_path, merged)
        _reset_process_state()
        set_settings(settings)
        return settings

    yield make
    _reset_process_state()
    set_settings(None)


# --- SQLite -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file per session; each test gets a copy (migrating costs more)."""
    directory = tmp_path_factory.mktemp("sqlite-template")
    path = directory / "template.db"
    url = f"sqlite:///{path}"
    _with_settings(directory, url, lambda: migrate.upgrade(url))
    for suffix in ("-wal", "-shm"):  # dispose_all() checkpointed the WAL; nothing may be left
        assert not Path(f"{path}{suffix}").exists() or Path(f"{path}{suffix}").stat().st_size == 0
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, _sqlite_template: Path) -> str:
    path = tmp_path / "certqueue.db"
    shutil.copyfile(_sqlite_template, path)
    os.chmod(path, 0o600)  # as certqueue creates it (a wider mode is warned about)
    return f"sqlite:///{path}"


# --- PostgreSQL ---------------------------------------------------------------------------------


def _pg_admin_dsn(dbname: str = "postgres") -> str:
    return f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={dbname} connect_timeout=3"


def pg_sqlalchemy_url(dbname: str) -> str:
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(_pg_admin_dsn(), autocommit=True) as conn:
        conn.execute(sql)


def _require_postgres() -> None:
    """Skip (developer machine without PostgreSQL) or fail (CI sets CERTQUEUE_REQUIRE_POSTGRES)."""
    try:
        import psycopg

        with psycopg.connect(_pg_admin_dsn(), autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        msg = f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER}: {type(exc).__name__}: {exc}"
        if os.environ.get(REQUIRE_POSTGRES_ENV):
            pytest.fail(f"{msg} ({REQUIRE_POSTGRES_ENV} is set, so this is an error)", pytrace=False)
        pytest.skip(f"{msg} (set {REQUIRE_POSTGRES_ENV}=1 to make this an error)")


def create_pg_database() -> str:
    """A new empty database; returns its name. Drop it with ``drop_pg_database``."""
    _require_postgres()
    name = "certqueue_t_" + secrets.token_hex(6)
    _pg_admin(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    db.dispose_all()  # our own pooled connections first
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = create_pg_database()
    url = pg_sqlalchemy_url(name)
    try:
        _with_settings(tmp_path_factory.mktemp("pg"), url, lambda: migrate.upgrade(url))
        yield url
    finally:
        drop_pg_database(name)


def _truncate_all(url: str, tmp_dir: Path) -> None:
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)

    def run() -> None:
        with db.get_engine(url).begin() as conn:
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))

    _with_settings(tmp_dir, url, run)


# --- both backends ------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    url = str(request.getfixturevalue("pg_url"))
    _truncate_all(url, tmp_path)
    return url


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    name = create_pg_database()
    try:
        yield pg_sqlalchemy_url(name)
    finally:
        drop_pg_database(name)


@pytest.fixture
def db_settings(db_url: str, settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory(database_url=db_url)


def backend_of(url: str) -> str:
    return "postgres" if url.startswith("postgresql") else "sqlite"


def count_rows(table: type[Base]) -> int:
    """Rows in ``table`` of the installed settings' database (a fresh read-only session)."""
    with db.session_scope(write=False) as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


# --- certificates -------------------------------------------------------------------------------


def make_cert_pem(
    names: tuple[str, ...] = ("example.com",),
    *,
    days: float = 90,
    not_before: dt.datetime | None = None,
    key_type: str = "ec256",
) -> tuple[str, bytes]:
    """A self-signed leaf for ``names`` valid ``days`` from ``not_before`` (default: an hour ago);
    returns (certificate PEM, PKCS#8 key PEM)."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    key = (
        rsa.generate_private_key(65537, 2048)
        if key_type == "rsa2048"
        else ec.generate_private_key(ec.SECP256R1())
    )
    start = not_before or (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem
