"""certqueue.config: layers, aliases, errors that name their layer and key, masking, sources; the
committed settings file and the generated reference; ``certqueue config show`` through the CLI."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from certqueue import config
from certqueue.config import (
    LETS_ENCRYPT_PRODUCTION,
    LETS_ENCRYPT_STAGING,
    AcmeSettings,
    LoadedSettings,
    Settings,
    load_settings,
    masked_dump,
)
from certqueue.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "settings" / "certqueue.yaml"
MASK = "**********"


@pytest.fixture
def sdir(tmp_path: Path) -> Path:
    d = tmp_path / "settings"
    d.mkdir()
    return d


def _write(d: Path, name: str, text: str) -> Path:
    path = d / name
    path.write_text(text)
    return path


def load(
    d: Path, *, env: dict[str, str] | None = None, overrides: dict[str, Any] | None = None
) -> LoadedSettings:
    return load_settings(overrides=overrides, directory=d, environ=env or {})


def _leaf_keys(data: Any, prefix: str = "") -> set[str]:
    return set(config._leaves(data, prefix))


# --- layers ---------------------------------------------------------------------------------------


def test_defaults_with_no_files(sdir: Path) -> None:
    loaded = load(sdir)
    assert loaded.settings.model_dump() == Settings().model_dump()
    assert set(loaded.sources.values()) == {"default"}
    assert loaded.sources.keys() == _leaf_keys(Settings().model_dump(mode="json", by_alias=True))
    s = loaded.settings
    assert s.automation.renewal_threshold_days == 30
    assert s.database.url == "sqlite:///var/certqueue.db"
    assert s.acme.directory == LETS_ENCRYPT_PRODUCTION


def test_local_yaml_deep_merges_over_the_committed_file(sdir: Path) -> None:
    committed = _write(
        sdir,
        "certqueue.yaml",
        """
acme:
  email: ops@example.com
  staging: false
  key_type: ec384
automation:
  renewal_threshold_days: 20
""",
    )
    local = _write(sdir, "local.yaml", "acme:\n  staging: true\n")
    loaded = load(sdir)
    s = loaded.settings
    assert s.acme.staging is True  # from local.yaml
    assert s.acme.email == "ops@example.com" and s.acme.key_type == "ec384"  # siblings kept
    assert s.automation.renewal_threshold_days == 20
    assert s.automation.check_interval_hours == 24  # untouched default
    assert loaded.sources["acme.staging"] == str(local)
    assert loaded.sources["acme.email"] == str(committed)
    assert loaded.sources["automation.renewal_threshold_days"] == str(committed)
    assert loaded.sources["automation.check_interval_hours"] == "default"


def test_env_beats_yaml_and_overrides_beat_env(sdir: Path) -> None:
    _write(sdir, "certqueue.yaml", "automation:\n  renewal_threshold_days: 20\n  retry_attempts: 7\n")
    env = {"CERTQUEUE_AUTOMATION__RENEWAL_THRESHOLD_DAYS": "45", "CERTQUEUE_ACME__STAGING": "true"}
    loaded = load(sdir, env=env)
    assert loaded.settings.automation.renewal_threshold_days == 45.0
    assert loaded.settings.automation.retry_attempts == 7
    assert loaded.settings.acme.staging is True
    assert (
        loaded.sources["automation.renewal_threshold_days"]
        == "env CERTQUEUE_AUTOMATION__RENEWAL_THRESHOLD_DAYS"
    )
    assert loaded.sources["acme.staging"] == "env CERTQUEUE_ACME__STAGING"

    for overrides in (
        {"automation.renewal_threshold_days": 10},
        {"automation": {"renewal_threshold_days": 10}},
    ):
        loaded = load(sdir, env=env, overrides=overrides)
        assert loaded.settings.automation.renewal_threshold_days == 10
        assert loaded.settings.automation.retry_attempts == 7  # a nested override merges too
        assert loaded.sources["automation.renewal_threshold_days"] == "override"


def test_runtime_layer_sits_between_files_and_env(sdir: Path) -> None:
    _write(sdir, "certqueue.yaml", "automation:\n  renewal_threshold_days: 20\n  retry_attempts: 7\n")
    runtime = {"automation.renewal_threshold_days": 40, "automation.retry_attempts": 9}
    loaded = load_settings(
        directory=sdir, environ={"CERTQUEUE_AUTOMATION__RETRY_ATTEMPTS": "2"}, runtime=runtime
    )
    assert loaded.settings.automation.renewal_threshold_days == 40
    assert loaded.sources["automation.renewal_threshold_days"] == "runtime (database)"
    assert loaded.settings.automation.retry_attempts == 2  # env beats runtime


def test_env_json_values_and_nested_provider_keys(sdir: Path) -> None:
    regions = [
        {"name": "us-east-1", "provider": "aws"},
        {"name": "web1", "provider": "local", "path": "/srv"},
    ]
    env = {
        "CERTQUEUE_MULTI_REGION__REGIONS": json.dumps(regions),
        "CERTQUEUE_CHALLENGES__DNS_RESOLVERS": '["127.0.0.1:5353"]',
        "CERTQUEUE_CHALLENGES__RFC2136__NAMESERVER": "127.0.0.1:5353",
        "CERTQUEUE_LETS_ENCRYPT__EMAIL": "le@example.com",  # the guide's section name, double underscore
    }
    loaded = load(sdir, env=env)
    s = loaded.settings
    assert [r.name for r in s.multi_region.regions] == ["us-east-1", "web1"]
    assert s.region("us-east-1").target == "aws_acm"
    assert s.region("web1").target_settings() == {"name": "web1", "path": "/srv"}
    assert s.challenges.dns_resolvers == ["127.0.0.1:5353"]
    assert s.challenges.provider_settings("rfc2136") == {"nameserver": "127.0.0.1:5353"}
    assert s.challenges.provider_settings("cloudflare") == {}
    assert s.acme.email == "le@example.com"
    assert loaded.sources["multi_region.regions"] == "env CERTQUEUE_MULTI_REGION__REGIONS"
    assert loaded.sources["challenges.rfc2136.nameserver"] == "env CERTQUEUE_CHALLENGES__RFC2136__NAMESERVER"
    assert loaded.sources["acme.email"] == "env CERTQUEUE_LETS_ENCRYPT__EMAIL"
    with pytest.raises(ConfigError, match="no region named"):
        s.region("mars-1")


def test_reserved_and_foreign_variables_are_ignored(sdir: Path) -> None:
    env = {
        "CERTQUEUE_SETTINGS_DIR": "/x",
        "CERTQUEUE_HOME": "/y",
        "CERTQUEUE_REQUIRE_POSTGRES": "1",
        "CERTQUEUE_FAILPOINTS": "deploy.before=error",
        "PATH": "/bin",
        "MAHAVISHNU_X": "1",
    }
    assert load(sdir, env=env).settings.model_dump() == Settings().model_dump()


GUIDE_SETTINGS = """
certificate_management:
  enabled: true

  # Storage configuration
  storage:
    backend: local  # local, aws, azure
    encryption_key_path: /etc/mahavishnu/cert_key
    storage_path: /var/lib/mahavishnu/certificates

  # Let's Encrypt configuration
  lets_encrypt:
    enabled: true
    staging: false  # Use staging for development
    email: admin@example.com
    directory_url: https://acme-v02.api.letsencrypt.org/directory

  # Challenge configuration
  challenges:
    default_type: http-01  # http-01, dns-01
    http_port: 80
    dns_provider: cloudflare  # cloudflare, route53, azure

  # Automation configuration
  automation:
    auto_renew: true
    renewal_threshold_days: 30  # Renew 30 days before expiration
    check_interval_hours: 24
    retry_attempts: 3
    retry_delay_seconds: 300

  # Multi-region configuration
  multi_region:
    enabled: false
    regions:
      - name: us-east-1
        provider: aws
        acm_enabled: true
      - name: westeurope
        provider: azure
        key_vault: https://kv.vault.azure.net/

  # Monitoring configuration
  monitoring:
    enabled: true
    prometheus_port: 9091
    alert_threshold_days: 14
"""

GUIDE_LOCAL = """
# Local development overrides
certificate_management:
  lets_encrypt:
    staging: true  # Use Let's Encrypt staging in development
  storage:
    storage_path: ./dev_certificates
"""


def test_the_guides_keys_that_do_nothing_are_not_settings(
    sdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """issue 14: ``enabled`` and ``storage.storage_path`` were documented and validated, and nothing
    read them. A file in the guide's shape still loads; ``enabled: false`` is refused (certqueue has
    no master switch, and issuing while the file says off would be worse), ``storage_path`` is
    dropped with a warning, and neither is accepted from the environment."""
    _write(
        sdir, "certqueue.yaml", "certificate_management:\n  enabled: true\n  storage:\n    storage_path: /x\n"
    )
    with caplog.at_level("WARNING", logger="certqueue.config"):
        s = load(sdir).settings
    assert "storage.storage_path is ignored" in caplog.text
    assert "enabled" not in s.model_dump() and "storage_path" not in s.model_dump()["storage"]
    _write(sdir, "certqueue.yaml", "certificate_management:\n  enabled: false\n")
    with pytest.raises(ConfigError) as info:
        load(sdir)
    assert info.value.key == "enabled" and "no master switch" in str(info.value)
    _write(sdir, "certqueue.yaml", "")
    for var in ("CERTQUEUE_ENABLED", "CERTQUEUE_STORAGE__STORAGE_PATH"):
        with pytest.raises(ConfigError):
            load(sdir, env={var: "true"})
    committed = yaml.safe_load((ROOT / "settings" / "certqueue.yaml").read_text())
    assert "enabled" not in committed and "storage_path" not in committed["storage"]


def test_the_guides_files_load_as_written(sdir: Path) -> None:
    committed = _write(sdir, "certqueue.yaml", GUIDE_SETTINGS)
    local = _write(sdir, "local.yaml", GUIDE_LOCAL)
    loaded = load(sdir)
    s = loaded.settings
    assert s.acme.email == "admin@example.com"
    assert s.acme.staging is True and loaded.sources["acme.staging"] == str(local)
    assert s.acme.directory_url == LETS_ENCRYPT_PRODUCTION  # explicit URL wins over staging
    assert not hasattr(s, "enabled") and not hasattr(s.storage, "storage_path")  # not settings (issue 14)
    assert s.storage.encryption_key_path == Path("/etc/mahavishnu/cert_key")  # sibling kept
    assert s.challenges.dns_provider == "cloudflare"
    assert [(r.name, r.target) for r in s.multi_region.regions] == [
        ("us-east-1", "aws_acm"),
        ("westeurope", "azure_keyvault"),
    ]
    assert s.region("westeurope").target_settings()["key_vault"] == "https://kv.vault.azure.net/"
    assert loaded.sources["acme.email"] == str(committed)


def test_acme_and_lets_encrypt_in_one_file_merge_with_acme_winning(sdir: Path) -> None:
    _write(
        sdir,
        "certqueue.yaml",
        "lets_encrypt:\n  staging: true\n  email: le@example.com\nacme:\n  email: acme@example.com\n",
    )
    s = load(sdir).settings
    assert s.acme.staging is True and s.acme.email == "acme@example.com"


@pytest.mark.parametrize(
    ("staging", "url", "expected"),
    [
        (False, None, LETS_ENCRYPT_PRODUCTION),
        (True, None, LETS_ENCRYPT_STAGING),
        (True, "https://127.0.0.1:14000/dir", "https://127.0.0.1:14000/dir"),
        (False, "https://acme.zerossl.com/v2/DV90", "https://acme.zerossl.com/v2/DV90"),
    ],
)
def test_directory_presets(staging: bool, url: str | None, expected: str) -> None:
    assert AcmeSettings(staging=staging, directory_url=url).directory == expected
    assert LETS_ENCRYPT_STAGING == "https://acme-staging-v02.api.letsencrypt.org/directory"
    assert LETS_ENCRYPT_PRODUCTION == "https://acme-v02.api.letsencrypt.org/directory"


def test_database_url_is_normalized_to_psycopg() -> None:
    assert config.DatabaseSettings(url="postgresql://u@h/db").url == "postgresql+psycopg://u@h/db"
    assert config.DatabaseSettings(url="postgres://u@h/db").url == "postgresql+psycopg://u@h/db"


# --- errors ---------------------------------------------------------------------------------------

# (layer, content, expected key, a fragment of the message); layer "yaml"/"local": file content,
# "env": variables, "override": overrides. The expected source is derived from the layer.
ERRORS: list[tuple[str, Any, str, str]] = [
    ("yaml", "automation:\n  renewal_threshold: 30\n", "automation.renewal_threshold", "unknown key"),
    ("yaml", "bogus:\n  a: 1\n", "bogus", "unknown key"),
    ("yaml", "acme:\n  stagging: true\n", "acme.stagging", "unknown key"),
    ("local", "storage:\n  key_path: /x\n", "storage.key_path", "unknown key"),
    ("yaml", "automation:\n  renewal_threshold_days: soon\n", "automation.renewal_threshold_days", "number"),
    (
        "yaml",
        "automation:\n  renewal_threshold_days: -5\n",
        "automation.renewal_threshold_days",
        "greater than 0",
    ),
    (
        "yaml",
        "automation:\n  renewal_threshold_days: 0\n",
        "automation.renewal_threshold_days",
        "greater than 0",
    ),
    ("yaml", "automation:\n  renewal_jitter: 1.5\n", "automation.renewal_jitter", "less than 1"),
    ("yaml", "challenges:\n  http_port: 70000\n", "challenges.http_port", "less than or equal to 65535"),
    ("yaml", "challenges:\n  default_type: dns-persist-01\n", "challenges.default_type", "http-01"),
    (
        "yaml",
        "multi_region:\n  regions:\n    - name: us-east-1\n",
        "multi_region.regions.0.provider",
        "Field required",
    ),
    (
        "yaml",
        "multi_region:\n  regions:\n    - name: a\n      provider: aws\n    - name: a\n      provider: gcp\n",
        "multi_region",
        "unique",
    ),
    (
        "yaml",
        "multi_region:\n  regions:\n    - name: 'bad name'\n      provider: aws\n",
        "multi_region.regions.0.name",
        "pattern",
    ),
    (
        "yaml",
        "multi_region:\n  regions:\n    - name: x\n      provider: oracle\n",
        "multi_region.regions.0.provider",
        "aws",
    ),
    ("yaml", "database:\n  url: mysql://u@h/db\n", "database.url", "postgresql"),
    ("yaml", "storage:\n  backend: s3\n", "storage.backend", "local"),
    ("env", {"CERTQUEUE_CHALLENGES__HTTP_PORT": "eighty"}, "challenges.http_port", "integer"),
    ("env", {"CERTQUEUE_ACME__STAGGING": "1"}, "acme.stagging", "unknown key"),
    (
        "env",
        {"CERTQUEUE_MULTI_REGION__REGIONS": '[{"name": "x"}]'},
        "multi_region.regions.0.provider",
        "Field required",
    ),
    (
        "override",
        {"automation.renewal_threshold_days": -1},
        "automation.renewal_threshold_days",
        "greater than 0",
    ),
    ("override", {"acme.nope": 1}, "acme.nope", "unknown key"),
]


@pytest.mark.parametrize(
    ("layer", "content", "key", "fragment"), ERRORS, ids=[f"{e[0]}-{e[2]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_errors_name_the_layer_and_the_key(
    sdir: Path, layer: str, content: Any, key: str, fragment: str
) -> None:
    env: dict[str, str] = {}
    overrides = None
    if layer == "yaml":
        source = str(_write(sdir, "certqueue.yaml", content))
    elif layer == "local":
        _write(sdir, "certqueue.yaml", "acme:\n  staging: false\n")
        source = str(_write(sdir, "local.yaml", content))
    elif layer == "env":
        env = content
        source = f"env {next(iter(content))}"
    else:
        overrides = content
        source = "override"
    with pytest.raises(ConfigError) as info:
        load(sdir, env=env, overrides=overrides)
    err = info.value
    assert (err.source, err.key) == (source, key), str(err)
    assert fragment in str(err)
    assert source in str(err) and key in str(err)
    assert err.reason == "config"


@pytest.mark.parametrize(
    "var",
    [
        "CERTQUEUE_LETS_ENCRYPT_STAGING",
        "CERTQUEUE_AUTOMATION_RENEWAL_THRESHOLD_DAYS",
        "CERTQUEUE_ACME_STAGING",
    ],
)
def test_single_underscore_variables_get_the_double_underscore_hint(sdir: Path, var: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(sdir, env={var: "false"})
    assert info.value.source == f"environment variable {var}"
    assert "double underscore" in str(info.value) and "CERTQUEUE_ACME__STAGING" in str(info.value)
    assert var in str(info.value)


@pytest.mark.parametrize("var", ["CERTQUEUE_NOPE__X", "CERTQUEUE_ACME____STAGING", "CERTQUEUE_ACME__"])
def test_unknown_section_or_empty_level_in_env(sdir: Path, var: str) -> None:
    with pytest.raises(ConfigError, match="unknown setting") as info:
        load(sdir, env={var: "1"})
    assert "double underscore" not in str(info.value)  # it has them; the hint would mislead


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- a\n- b\n", "top level must be a mapping"),
        ("acme: [unclosed\n", "not valid YAML"),
        ("certificate_management: [1]\n", "must be a mapping"),
    ],
)
def test_malformed_files(sdir: Path, text: str, fragment: str) -> None:
    path = _write(sdir, "certqueue.yaml", text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")) as info:
        load(sdir)
    assert info.value.source == str(path)


def test_an_empty_file_is_no_layer(sdir: Path) -> None:
    _write(sdir, "certqueue.yaml", "# nothing yet\n")
    assert load(sdir).settings.model_dump() == Settings().model_dump()


# --- secrets and sources --------------------------------------------------------------------------

SECRETS = {
    "acme.eab_hmac_key": "hmac-SECRET-0001",
    "challenges.cloudflare.api_token": "cf-SECRET-0002",
    "challenges.azure.client_secret": "az-SECRET-0003",
    "challenges.route53.secret_access_key": "r53-SECRET-0004",
    "challenges.rfc2136.tsig_secret": "tsig-SECRET-0005",
}


def _secret_layers(sdir: Path) -> tuple[Path, dict[str, str], dict[str, Any]]:
    path = _write(
        sdir,
        "certqueue.yaml",
        """
acme:
  email: ops@example.com
  eab_kid: kid-1
challenges:
  dns_provider: cloudflare
  cloudflare:
    api_token: cf-SECRET-0002
    zone_id: z1
  azure:
    client_secret: az-SECRET-0003
    client_id: c1
multi_region:
  regions:
    - name: westeurope
      provider: azure
      client_secret: kv-SECRET-0006
""",
    )
    env = {
        "CERTQUEUE_ACME__EAB_HMAC_KEY": "hmac-SECRET-0001",
        "CERTQUEUE_CHALLENGES__ROUTE53__SECRET_ACCESS_KEY": "r53-SECRET-0004",
    }
    overrides = {"challenges.rfc2136.tsig_secret": "tsig-SECRET-0005", "automation.retry_attempts": 5}
    return path, env, overrides


def test_masked_dump_hides_secrets_and_names_sources(sdir: Path) -> None:
    path, env, overrides = _secret_layers(sdir)
    loaded = load(sdir, env=env, overrides=overrides)
    # the values are there for the code that needs them...
    assert loaded.settings.acme.eab_hmac_key is not None
    assert loaded.settings.acme.eab_hmac_key.get_secret_value() == "hmac-SECRET-0001"
    assert loaded.settings.challenges.provider_settings("cloudflare")["api_token"] == "cf-SECRET-0002"
    # ...and never in what config show prints
    dump = masked_dump(loaded)
    text = json.dumps(dump)
    for secret in [*SECRETS.values(), "kv-SECRET-0006"]:
        assert secret not in text
    for key in SECRETS:
        assert dump[key]["value"] == MASK, key
    assert dump["multi_region.regions"]["value"][0]["client_secret"] == MASK
    assert dump["multi_region.regions"]["value"][0]["name"] == "westeurope"
    assert dump["acme.eab_kid"]["value"] == "kid-1"  # not a secret
    assert dump["challenges.cloudflare.zone_id"]["value"] == "z1"
    assert dump["acme.email"] == {"value": "ops@example.com", "source": str(path)}
    assert dump["acme.eab_hmac_key"]["source"] == "env CERTQUEUE_ACME__EAB_HMAC_KEY"
    assert (
        dump["challenges.route53.secret_access_key"]["source"]
        == "env CERTQUEUE_CHALLENGES__ROUTE53__SECRET_ACCESS_KEY"
    )
    assert dump["challenges.rfc2136.tsig_secret"]["source"] == "override"
    assert dump["automation.retry_attempts"] == {"value": 5, "source": "override"}
    assert dump["automation.check_interval_hours"] == {"value": 24.0, "source": "default"}
    assert dump["acme.eab_hmac_key"] != dump["acme.eab_kid"]
    # unset secrets stay null, not a mask that suggests a value
    assert masked_dump(load(sdir.parent / "none"))["acme.eab_hmac_key"]["value"] is None
    # an alias key is reported under the name a user writes, with its real source
    _write(sdir, "local.yaml", "logging:\n  json: true\n")
    dump = masked_dump(load(sdir, env=env))
    assert dump["logging.json"] == {"value": True, "source": str(sdir / "local.yaml")}
    # the repr of the model hides SecretStr fields
    assert "hmac-SECRET-0001" not in repr(loaded.settings)


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No developer CERTQUEUE_* variable may leak into a CLI run."""
    import os

    for var in [v for v in os.environ if v.startswith("CERTQUEUE_")]:
        monkeypatch.delenv(var)
    yield


def test_config_show_json_through_the_cli(
    sdir: Path, clean_environ: None, settings_factory: Callable[..., Settings]
) -> None:
    from certqueue.cli import main

    path, env, _ = _secret_layers(sdir)
    env = {**env, "CERTQUEUE_SETTINGS_DIR": str(sdir)}
    result = CliRunner().invoke(
        main, ["--set", "automation.retry_attempts=5", "config", "show", "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    for secret in [*SECRETS.values(), "kv-SECRET-0006"]:
        assert secret not in result.output
    dump = json.loads(result.output)
    assert dump["acme.eab_hmac_key"] == {"value": MASK, "source": "env CERTQUEUE_ACME__EAB_HMAC_KEY"}
    assert dump["challenges.cloudflare.api_token"] == {"value": MASK, "source": str(path)}
    assert dump["acme.email"] == {"value": "ops@example.com", "source": str(path)}
    assert dump["automation.retry_attempts"] == {"value": 5, "source": "override"}
    assert dump["automation.renewal_threshold_days"] == {"value": 30.0, "source": "default"}

    # the table form masks too
    table = CliRunner().invoke(main, ["config", "show"], env=env)
    assert table.exit_code == 0, table.output
    assert "hmac-SECRET-0001" not in table.output and "acme.eab_hmac_key" in table.output


def test_config_errors_through_the_cli_exit_2(
    sdir: Path, clean_environ: None, settings_factory: Callable[..., Settings]
) -> None:
    from certqueue.cli import main

    path = _write(sdir, "certqueue.yaml", "automation:\n  renewal_threshold: 30\n")
    result = CliRunner().invoke(main, ["config", "show"], env={"CERTQUEUE_SETTINGS_DIR": str(sdir)})
    assert result.exit_code == 2
    assert "unknown key" in result.output and str(path) in result.output.replace("\n", "")
    result = CliRunner().invoke(
        main,
        ["config", "show"],
        env={"CERTQUEUE_SETTINGS_DIR": str(sdir.parent / "x"), "CERTQUEUE_LETS_ENCRYPT_STAGING": "true"},
    )
    assert result.exit_code == 2 and "double underscore" in result.output


# --- the committed settings file and the generated reference ---------------------------------------


def test_committed_settings_file_has_every_key_and_loads_to_the_defaults(tmp_path: Path) -> None:
    data = yaml.safe_load(COMMITTED.read_text())
    expected = _leaf_keys(Settings().model_dump(mode="json", by_alias=True))
    assert _leaf_keys(data) == expected
    # exactly the defaults (copied alone: a developer's settings/local.yaml must not interfere)
    shutil.copy(COMMITTED, tmp_path / "certqueue.yaml")
    loaded = load_settings(directory=tmp_path, environ={})
    assert loaded.settings.model_dump() == Settings().model_dump()
    assert set(loaded.sources.values()) == {str(tmp_path / "certqueue.yaml")}


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_key_in_the_committed_file_has_a_comment() -> None:
    comments = _generator().yaml_comments(COMMITTED.read_text())
    expected = _leaf_keys(Settings().model_dump(mode="json", by_alias=True))
    missing = sorted(k for k in expected if not comments.get(k))
    assert missing == []
    sections = [
        k
        for k, f in Settings.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, config.BaseModel)
    ]
    assert all(comments.get(s) for s in sections)


def test_configuration_reference_is_up_to_date() -> None:
    gen = _generator()
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert gen.render() == committed, "docs/configuration.md is stale: run scripts/gen_config_docs.py"
    for key in _leaf_keys(Settings().model_dump(mode="json", by_alias=True)):
        assert f"`{key}`" in committed
    assert gen.main(["--check"]) == 0


def test_the_generator_refuses_an_undocumented_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gen = _generator()
    stripped = tmp_path / "certqueue.yaml"
    stripped.write_text(COMMITTED.read_text().replace("  renewal_jitter: 0.1  #", "  renewal_jitter: 0.1  "))
    monkeypatch.setattr(gen, "SETTINGS_YAML", stripped)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    with pytest.raises(gen.DocError, match=r"automation\.renewal_jitter"):
        gen.render()


def test_local_yaml_example_is_valid(tmp_path: Path) -> None:
    shutil.copy(COMMITTED, tmp_path / "certqueue.yaml")
    shutil.copy(ROOT / "settings" / "local.yaml.example", tmp_path / "local.yaml")
    s = load_settings(directory=tmp_path, environ={}).settings
    assert s.acme.staging is True and s.acme.email == "admin@example.com"
    assert s.acme.directory == LETS_ENCRYPT_STAGING


def test_storage_backend_is_the_default_of_the_guides_store(
    settings_factory: Callable[..., Any], sqlite_url: str
) -> None:
    """issue 14: ``storage.backend`` ("the guide's CertificateStore backend") was never read: a
    ``CertificateStore()`` was local whatever the setting said."""
    from certqueue.manager import CertificateStore

    settings = settings_factory(database_url=sqlite_url, **{"storage.backend": "aws"})
    assert CertificateStore(settings=settings).backend == "aws"
    assert CertificateStore("local", settings=settings).backend == "local"  # an explicit choice wins
    local = settings_factory(database_url=sqlite_url)
    assert CertificateStore(settings=local, storage_path="/srv/certs").backend == "local"
