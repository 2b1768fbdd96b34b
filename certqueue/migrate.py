"""``certqueue db upgrade``: create or migrate the schema (Alembic). Running it twice is a no-op."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from certqueue.db import get_engine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"


def _quiet_alembic() -> None:
    """One line from ``certqueue db upgrade``, not twenty: alembic logs at INFO while it migrates,
    and (1.18+) while it is imported (each plugin it sets up), so alembic is imported only after
    this, inside the functions below."""
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("alembic").setLevel(logging.WARNING)


def alembic_config(url: str) -> Config:
    _quiet_alembic()
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> str | None:
    """Migrate to ``revision``; returns the revision the database is at afterwards."""
    engine = get_engine(url)
    cfg = alembic_config(str(engine.url.render_as_string(hide_password=False)))
    from alembic import command

    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(url)


def current_revision(url: str | None = None) -> str | None:
    _quiet_alembic()
    from alembic.runtime.migration import MigrationContext

    engine = get_engine(url, write=False)
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    cfg = alembic_config("sqlite://")
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(cfg).get_current_head()
