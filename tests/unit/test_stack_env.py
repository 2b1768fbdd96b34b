"""The one builder of a test stack's environment (tests.conftest_stack.stack_env): what it sets is
what the settings loader reads, with no process started."""

from __future__ import annotations

import json
from pathlib import Path

from certqueue.config import load_settings
from tests.conftest_stack import TEST_CA_BUDGETS, stack_env


def test_an_embedded_stack(tmp_path: Path) -> None:
    env = stack_env(tmp_path, state_dir="state", log_level="INFO")
    assert set(env) == {
        "CERTQUEUE_SETTINGS_DIR",
        "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH",
        "CERTQUEUE_DATABASE__URL",
        "CERTQUEUE_BROKER__FILESYSTEM_PATH",
        "CERTQUEUE_LOGGING__LEVEL",
    }
    s = load_settings(environ=env, directory=Path(env["CERTQUEUE_SETTINGS_DIR"])).settings
    assert s.database.url == f"sqlite:///{tmp_path / 'state' / 'certqueue.db'}"
    assert s.broker.url == "" and s.broker.filesystem_path == tmp_path / "state" / "broker"
    assert s.storage.encryption_key_path == tmp_path / "master.key"
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "settings").is_dir()
    assert s.logging.level == "INFO"


def test_a_stack_with_a_ca_servers_regions_and_more_settings(tmp_path: Path) -> None:
    regions = [{"name": "edge", "provider": "local", "path": str(tmp_path / "edge")}]
    env = stack_env(
        tmp_path,
        database_url="postgresql+psycopg://postgres@127.0.0.1:5432/cq_x",
        broker_url="redis://127.0.0.1:6379/3",
        acme=("https://127.0.0.1:14000/dir", str(tmp_path / "ca.pem")),
        email="chaos@example.test",
        http_port=5002,
        regions=regions,
        settings={"automation.retry_attempts": "0", "challenges.dns_resolvers": json.dumps(["127.0.0.1"])},
    )
    assert "CERTQUEUE_BROKER__FILESYSTEM_PATH" not in env
    s = load_settings(environ=env, directory=tmp_path / "settings").settings
    assert s.database.url.endswith("/cq_x") and s.broker.url == "redis://127.0.0.1:6379/3"
    assert s.acme.directory_url == "https://127.0.0.1:14000/dir"
    assert s.acme.ca_bundle == tmp_path / "ca.pem" and s.acme.email == "chaos@example.test"
    assert (s.challenges.http_port, s.challenges.http_host) == (5002, "127.0.0.1")
    assert s.multi_region.enabled and [r.name for r in s.multi_region.regions] == ["edge"]
    assert s.automation.retry_attempts == 0 and s.challenges.dns_resolvers == ["127.0.0.1"]
    assert s.rate_limits.new_orders_per_account == int(TEST_CA_BUDGETS["rate_limits.new_orders_per_account"])
    assert s.logging.level == "DEBUG"


def test_an_existing_master_key_is_kept(tmp_path: Path) -> None:
    stack_env(tmp_path)
    key = (tmp_path / "master.key").read_bytes()
    stack_env(tmp_path)  # a second node of the same stack
    assert (tmp_path / "master.key").read_bytes() == key
