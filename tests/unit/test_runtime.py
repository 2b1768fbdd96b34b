"""Runtime setting overrides in the database (``certqueue.runtime``), the settings layer they form
(``certqueue.config``) and the guide's ``update_config``, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from certqueue import config, runtime
from certqueue.config import Settings, configure, get_settings, load_settings, set_settings
from certqueue.db import session_scope
from certqueue.errors import ConfigError
from certqueue.manager import update_config
from certqueue.models import RuntimeSetting
from tests.conftest_db import count_rows


@pytest.fixture(autouse=True)
def _fresh_reader() -> Iterator[None]:
    runtime.dispose()
    yield
    runtime.dispose()
    set_settings(None)


def env_for(url: str, tmp: Path) -> dict[str, str]:
    (tmp / "settings").mkdir(exist_ok=True)
    return {"CERTQUEUE_SETTINGS_DIR": str(tmp / "settings"), "CERTQUEUE_DATABASE__URL": url}


def test_set_load_clear_round_trip(db_settings: Settings) -> None:
    with session_scope() as s:
        written = runtime.set_overrides(
            s,
            {
                "certificate_management": {"automation": {"renewal_threshold_days": 45}},
                "lets_encrypt.staging": True,
                "multi_region": {"regions": [{"name": "edge", "provider": "local", "path": "/srv"}]},
            },
        )
    assert written == {
        "automation.renewal_threshold_days": 45,
        "acme.staging": True,
        "multi_region.regions": [{"name": "edge", "provider": "local", "path": "/srv"}],
    }
    with session_scope(write=False) as s:
        assert runtime.load_runtime_overrides(s) == {
            "acme": {"staging": True},
            "automation": {"renewal_threshold_days": 45},
            "multi_region": {"regions": [{"name": "edge", "provider": "local", "path": "/srv"}]},
        }
    # a key replaces what is stored above or below it
    with session_scope() as s:
        runtime.set_overrides(s, {"challenges.cloudflare": {"zone": "a"}})
        runtime.set_overrides(s, {"challenges": {"cloudflare": {"zone": "b", "ttl": 60}}})
    with session_scope(write=False) as s:
        assert runtime.list_overrides(s)["challenges.cloudflare.zone"] == "b"
        assert "challenges.cloudflare" not in runtime.list_overrides(s)
    assert runtime.clear_override("challenges") == 2
    assert runtime.clear_override("lets_encrypt.staging") == 1
    assert runtime.clear_override("nothing.here") == 0
    with session_scope(write=False) as s:
        assert set(runtime.list_overrides(s)) == {"automation.renewal_threshold_days", "multi_region.regions"}


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"database": {"url": "sqlite:///x.db"}}, "cannot be changed at runtime"),
        ({"broker.url": "redis://elsewhere"}, "cannot be changed at runtime"),
        ({"storage.encryption_key_path": "/tmp/k"}, "cannot be changed at runtime"),
        ({"acme.eab_hmac_key": "x"}, "credentials"),
        ({"challenges.cloudflare.api_token": "x"}, "credentials"),
        ({"acme.account_key_path": "/tmp/a.pem"}, "credentials"),
    ],
)
def test_keys_that_may_not_change_at_runtime(db_settings: Settings, changes: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle), session_scope() as s:
        runtime.set_overrides(s, changes)
    assert count_rows(RuntimeSetting) == 0


def test_the_layer_sits_between_local_yaml_and_the_environment(db_settings: Settings, tmp_path: Path) -> None:
    url = db_settings.database.url
    env = env_for(url, tmp_path)
    (tmp_path / "settings" / "local.yaml").write_text(
        "automation:\n  renewal_threshold_days: 20\n  check_interval_hours: 12\n"
    )
    with session_scope() as s:
        runtime.set_overrides(s, {"automation": {"renewal_threshold_days": 45, "check_interval_hours": 6}})
    loaded = load_settings(environ=env, directory=tmp_path / "settings", runtime_from_database=True)
    assert loaded.settings.automation.renewal_threshold_days == 45
    assert loaded.sources["automation.renewal_threshold_days"] == "runtime (database)"
    env["CERTQUEUE_AUTOMATION__CHECK_INTERVAL_HOURS"] = "3"
    loaded = load_settings(environ=env, directory=tmp_path / "settings", runtime_from_database=True)
    assert loaded.settings.automation.check_interval_hours == 3  # the environment wins
    # without the flag the database is not read (explicit loads stay pure)
    assert (
        load_settings(environ=env, directory=tmp_path / "settings").settings.automation.renewal_threshold_days
        == 20
    )


def test_an_invalid_stored_value_is_a_config_error_naming_the_layer(
    db_settings: Settings, tmp_path: Path
) -> None:
    with session_scope() as s:
        s.add(RuntimeSetting(key="automation.renewal_threshold_days", value=-1))
    with pytest.raises(ConfigError, match=r"runtime \(database\)"):
        load_settings(
            environ=env_for(db_settings.database.url, tmp_path),
            directory=tmp_path / "settings",
            runtime_from_database=True,
        )


def test_no_database_no_table_no_server(
    tmp_path: Path, empty_db_url: str, settings_factory: Callable
) -> None:
    settings_factory()
    missing = tmp_path / "missing.db"
    assert runtime.read_runtime_layer(f"sqlite:///{missing}") == {}
    assert not missing.exists()  # reading never creates a database
    assert runtime.read_runtime_layer(empty_db_url) == {}  # not migrated yet
    loaded = load_settings(
        environ=env_for(empty_db_url, tmp_path), directory=tmp_path / "settings", runtime_from_database=True
    )
    assert loaded.settings.automation.renewal_threshold_days == 30


def test_an_unreachable_server_keeps_the_last_values_and_backs_off(pg_url: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing"
    started = time.monotonic()
    assert runtime.read_runtime_layer(dead) == {}
    assert runtime.read_runtime_layer(dead) == {}  # backing off: no second connect attempt
    assert time.monotonic() - started < runtime.CONNECT_TIMEOUT_SECONDS + 1
    runtime._last_good[dead] = {"automation": {"renewal_threshold_days": 40}}
    assert runtime.read_runtime_layer(dead) == {"automation": {"renewal_threshold_days": 40}}


def test_configured_processes_see_changes_within_the_ttl(
    db_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_for(db_settings.database.url, tmp_path)
    monkeypatch.setenv("CERTQUEUE_RUNTIME_TTL_SECONDS", "3600")
    configure(environ=env, directory=tmp_path / "settings")
    assert get_settings().automation.renewal_threshold_days == 30
    with session_scope() as s:
        runtime.set_overrides(s, {"automation.renewal_threshold_days": 50})
    assert get_settings().automation.renewal_threshold_days == 30  # within the TTL: cached
    monkeypatch.setenv("CERTQUEUE_RUNTIME_TTL_SECONDS", "0")
    assert get_settings().automation.renewal_threshold_days == 50
    # a re-read that fails keeps the settings in force
    (tmp_path / "settings" / "local.yaml").write_text("automation: [not, a, mapping\n")
    assert get_settings().automation.renewal_threshold_days == 50
    (tmp_path / "settings" / "local.yaml").unlink()
    # settings installed as they are never change behind the installer's back
    set_settings(load_settings(environ=env, directory=tmp_path / "settings").settings)
    assert get_settings().automation.renewal_threshold_days == 30


def test_update_config_validates_before_storing(db_settings: Settings) -> None:
    with pytest.raises(ConfigError, match=r"automation\.renewal_threshold_days"):
        asyncio.run(update_config({"automation": {"renewal_threshold_days": 0}}))
    with pytest.raises(ConfigError, match="unknown key"):
        asyncio.run(update_config({"automation": {"threshold": 3}}))
    with pytest.raises(ConfigError, match="region names must be unique"):
        asyncio.run(
            update_config(
                {
                    "automation.renewal_threshold_days": 40,  # valid, but not stored: the batch fails
                    "multi_region.regions": [
                        {"name": "a", "provider": "local"},
                        {"name": "a", "provider": "local"},
                    ],
                }
            )
        )
    assert count_rows(RuntimeSetting) == 0
    stored = asyncio.run(
        update_config({"certificate_management": {"automation": {"renewal_threshold_days": 45}}})
    )
    assert stored == {"automation.renewal_threshold_days": 45}
    assert count_rows(RuntimeSetting) == 1
    # this process sees it at once, though its settings were installed as they are
    assert get_settings().automation.renewal_threshold_days == 45
    assert config._cached is not None and config._cached.recipe is None
