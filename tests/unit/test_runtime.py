"""Runtime setting overrides in the database (``certqueue.runtime``), the settings layer they form
(``certqueue.config``) and the guide's ``update_config``, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from certqueue import config, runtime, runtime_layer
from certqueue.config import Settings, configure, get_settings, load_settings, set_settings
from certqueue.db import session_scope
from certqueue.errors import ConfigError
from certqueue.manager import update_config
from certqueue.models import Event, RuntimeSetting
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
                "lets_encrypt.request_timeout_seconds": 20,
                "rate_limits": {"duplicate_certificates": 3},
            },
            actor="cli:alice",
        )
    assert written == {
        "automation.renewal_threshold_days": 45,
        "acme.request_timeout_seconds": 20,
        "rate_limits.duplicate_certificates": 3,
    }
    with session_scope(write=False) as s:
        assert runtime.load_runtime_overrides(s) == {
            "acme": {"request_timeout_seconds": 20},
            "automation": {"renewal_threshold_days": 45},
            "rate_limits": {"duplicate_certificates": 3},
        }
    with session_scope() as s:
        runtime.set_overrides(s, {"automation.renewal_threshold_days": 50}, actor="cli:bob")
    assert runtime.clear_override("automation", actor="cli:carol") == 1
    assert runtime.clear_override("lets_encrypt.request_timeout_seconds") == 1
    assert runtime.clear_override("nothing.here") == 0
    with session_scope(write=False) as s:
        assert set(runtime.list_overrides(s)) == {"rate_limits.duplicate_certificates"}
        events = s.execute(select(Event).where(Event.kind == "config").order_by(Event.id)).scalars().all()
    # every change is an event with its actor (and the value it replaced)
    assert [(e.actor, e.reason) for e in events] == [
        ("cli:alice", "set"),
        ("cli:alice", "set"),
        ("cli:alice", "set"),
        ("cli:bob", "set"),
        ("cli:carol", "unset"),
        ("certqueue", "unset"),
    ]
    assert events[3].data == {"key": "automation.renewal_threshold_days", "value": 50, "previous": 45}
    assert events[4].data == {"keys": ["automation.renewal_threshold_days"]}


ATTACK_REGION = [
    {
        "name": "us-east-1",
        "provider": "local",
        "path": "/tmp/stolen",
        "reload_command": "sh -c 'cp /srv/certs/privkey.pem /tmp/x'",
    }
]


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"database": {"url": "sqlite:///x.db"}}, "cannot be changed at runtime"),
        ({"broker.url": "redis://elsewhere"}, "cannot be changed at runtime"),
        ({"storage.encryption_key_path": "/tmp/k"}, "cannot be changed at runtime"),
        ({"acme.eab_hmac_key": "x"}, "credentials"),
        ({"acme.eab_kid": "x"}, "credentials"),
        ({"challenges.cloudflare.api_token": "x"}, "credentials"),
        ({"acme.account_key_path": "/tmp/a.pem"}, "cannot be changed at runtime"),
        # issue 13, finding 2: a region with a new reload command, path or credentials, and a new CA
        ({"multi_region": {"regions": ATTACK_REGION}}, "never read from the database"),
        ({"multi_region.enabled": True}, "cannot be changed at runtime"),
        ({"acme.directory_url": "http://169.254.169.254/latest/"}, "CA URLs"),
        ({"acme.fallback_directory_urls": ["https://evil.example/dir"]}, "cannot be changed at runtime"),
        ({"acme.staging": True}, "cannot be changed at runtime"),
        ({"acme.ca_bundle": "/tmp/evil.pem"}, "cannot be changed at runtime"),
        ({"challenges.rfc2136": {"nameserver": "198.51.100.1"}}, "endpoints"),
        ({"challenges.dns_provider": "route53"}, "cannot be changed at runtime"),
        ({"monitoring.bind": "0.0.0.0"}, "cannot be changed at runtime"),
        ({"enabled": False}, "unknown key"),  # not a setting at all (issue 14): refused the same
        ({"automation.renewal_threshold_days": [45]}, "a number or true/false"),
        ({"automation.renewal_threshold_days": "45"}, "a number or true/false"),
    ],
)
def test_keys_that_may_not_change_at_runtime(db_settings: Settings, changes: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle), session_scope() as s:
        runtime.set_overrides(s, changes)
    with pytest.raises(ConfigError, match=needle):
        asyncio.run(update_config(changes))
    assert count_rows(RuntimeSetting) == 0
    assert count_rows(Event) == 0


def test_config_set_refuses_the_reload_command_attack_and_writes_nothing(db_settings: Settings) -> None:
    from click.testing import CliRunner

    from certqueue.cli import main

    cli_settings = {"CERTQUEUE_DATABASE__URL": db_settings.database.url}
    for assignment in (
        f"multi_region.regions={json.dumps(ATTACK_REGION)}",
        "acme.directory_url=http://169.254.169.254/latest/meta-data/",
    ):
        result = CliRunner().invoke(main, ["config", "set", assignment], env=cli_settings)
        assert result.exit_code == 2, result.output
        assert "cannot be changed at runtime" in result.output
    assert count_rows(RuntimeSetting) == 0 and count_rows(Event) == 0


def test_rows_written_around_the_allowlist_are_ignored_when_read(
    db_settings: Settings, tmp_path: Path
) -> None:
    """Someone with SQL access writes the attack straight into the table: workers ignore it."""
    with session_scope() as s:
        s.add(RuntimeSetting(key="multi_region.regions", value=ATTACK_REGION))
        s.add(RuntimeSetting(key="multi_region.enabled", value=True))
        s.add(RuntimeSetting(key="acme.directory_url", value="http://169.254.169.254/latest/"))
        s.add(RuntimeSetting(key="automation.retry_attempts", value=[1]))
        s.add(RuntimeSetting(key="automation.renewal_threshold_days", value=44))
    loaded = load_settings(
        environ=env_for(db_settings.database.url, tmp_path),
        directory=tmp_path / "settings",
        runtime_from_database=True,
    )
    assert loaded.settings.multi_region.regions == [] and not loaded.settings.multi_region.enabled
    assert loaded.settings.acme.directory_url is None
    assert loaded.settings.automation.retry_attempts == 3
    assert loaded.settings.automation.renewal_threshold_days == 44  # an allowed key still applies


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
    runtime_layer._last_good[dead] = {"automation": {"renewal_threshold_days": 40}}
    assert runtime.read_runtime_layer(dead) == {"automation": {"renewal_threshold_days": 40}}


def _age_settings(seconds: float) -> None:
    """Make the process's settings ``seconds`` older (their TTL is read when they are loaded)."""
    from certqueue import config

    assert config._cached is not None
    config._cached.loaded_at -= seconds


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
    before = get_settings()
    _age_settings(3601)  # the TTL (read when they were loaded) has passed
    assert get_settings().automation.renewal_threshold_days == 50
    assert get_settings() is not before
    # a re-read that finds every layer as it was keeps the settings object (nothing validated again)
    kept = get_settings()
    _age_settings(3601)
    assert get_settings() is kept
    # a re-read that fails keeps the settings in force
    (tmp_path / "settings" / "local.yaml").write_text("automation: [not, a, mapping\n")
    _age_settings(3601)
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
    with pytest.raises(ConfigError, match=r"automation\.poll_initial_seconds"):
        asyncio.run(
            update_config(
                {
                    "automation.renewal_threshold_days": 40,  # valid, but not stored: the batch fails
                    "automation.poll_initial_seconds": 0,
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


def test_every_allowlisted_key_is_a_number_or_a_switch_of_the_settings() -> None:
    """The allowlist names real settings, each a threshold, timer, budget or switch (no str, path,
    list or mapping), so nothing that names a place, a program or a secret can be added to it by
    mistake."""
    from certqueue.config import Settings

    defaults = Settings()
    for key in runtime.RUNTIME_KEYS:
        section, leaf = key.split(".")
        value = getattr(getattr(defaults, section), leaf)
        assert isinstance(value, bool | int | float), key
