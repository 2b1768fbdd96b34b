"""The plugin registry (certqueue.plugins): entry points, the built-in fallback, load errors, the
settings tables; and a third-party plugin installed through a real entry point (the example of
docs/plugins.md, as a distribution on sys.path) that settings accept and a deploy goes through."""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from certqueue import plugins
from certqueue.config import RegionSettings, Settings, load_settings, masked_dump
from certqueue.dns.base import DNSProvider, load_provider, provider_names
from certqueue.dns.zones import Resolver
from certqueue.errors import ConfigError
from certqueue.plugins import Setting, read_settings
from certqueue.targets.base import Bundle, Target, load_target, target_names

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins.md"


# -- the registry --------------------------------------------------------------------------------


def test_builtin_table_equals_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert {g: declared[g] for g in plugins.BUILTIN} == plugins.BUILTIN


def test_installed_metadata_registers_the_builtins() -> None:
    """``make install`` put certqueue's own entry points in place (not only the fallback)."""
    from importlib.metadata import entry_points

    for group, builtins in plugins.BUILTIN.items():
        assert {ep.name: ep.value for ep in entry_points(group=group) if ep.name in builtins} == builtins


def test_builtins_work_without_metadata(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A checkout on sys.path with no installed distribution still finds the built-ins."""
    monkeypatch.setattr(plugins, "installed", lambda group: ())
    assert target_names() == ["aws_acm", "azure_keyvault", "gcp_certmanager", "local"]
    assert provider_names() == ["azure", "cloudflare", "rfc2136", "route53"]
    assert type(load_target("local", {"name": "x", "path": str(tmp_path)})).__name__ == "LocalFilesTarget"
    RegionSettings(name="x", provider="aws")  # the guide's short name still validates


def test_installed_metadata_is_read_once_per_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = plugins.entry_points

    def counting(group: str) -> Any:
        calls.append(group)
        return real(group=group)

    monkeypatch.setattr(plugins, "entry_points", counting)
    plugins.rescan()
    for _ in range(3):
        Settings(multi_region={"regions": [{"name": "a", "provider": "local", "path": "/x"}]})
    assert calls == [plugins.TARGETS]
    monkeypatch.syspath_prepend("/nonexistent-site")  # another path: read again
    plugins.names(plugins.TARGETS)
    assert calls == [plugins.TARGETS, plugins.TARGETS]
    plugins.rescan()


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_target("s3", {"name": "x"})
    assert "unknown target 's3'; known: aws_acm, azure_keyvault, gcp_certmanager, local" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_provider("gandi", {})
    assert "gandi" in str(info.value) and "cloudflare" in str(info.value)


def test_unknown_region_provider_is_a_config_error_when_settings_load(tmp_path: Path) -> None:
    (tmp_path / "certqueue.yaml").write_text("multi_region:\n  regions:\n    - name: x\n      provider: s3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(directory=tmp_path, environ={})
    message = str(info.value)
    assert "unknown target provider 's3'" in message and "gcp_certmanager" in message
    assert "multi_region.regions.0.provider" in message and "certqueue.yaml" in message


@pytest.mark.parametrize(
    "section",
    [
        {"challenges": {"dns_provider": "gandi"}},
        {"challenges": {"solvers": [{"name": "a", "provider": "gandi"}]}},
    ],
)
def test_unknown_dns_provider_is_a_config_error(section: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown DNS provider 'gandi'; known: azure, cloudflare"):
        Settings(**section)


# -- a third-party distribution, installed through a real entry point -----------------------------


def _code_block(text: str, lang: str, after: str) -> str:
    start = text.index(after)
    match = re.search(rf"```{lang}\n(.*?)```", text[start:], re.S)
    assert match, f"no {lang} block after {after!r}"
    return match.group(1)


@pytest.fixture
def inventory_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """docs/plugins.md's example package, installed as a distribution: its module and a dist-info
    whose entry_points.txt is what its pyproject.toml declares."""
    text = DOCS.read_text()
    site = tmp_path / "site"
    package = site / "certqueue_inventory"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(_code_block(text, "python", "## A complete example"))
    project = tomllib.loads(_code_block(text, "toml", "## A complete example"))["project"]
    info = site / "certqueue_inventory-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: 1.0\n")
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in entries.items()]
    # and one whose module is not installed
    lines += ["[certqueue.targets]", "broken = certqueue_inventory_missing:Target"]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    yield tmp_path
    plugins.rescan()
    for name in [m for m in sys.modules if m.startswith("certqueue_inventory")]:
        del sys.modules[name]


def test_third_party_target_is_found_configured_and_deploys(
    inventory_dist: Path, issue_bundle: Callable[..., Bundle], tmp_path: Path
) -> None:
    assert "inventory" in target_names() and "txtfile" in provider_names()
    book = tmp_path / "book.json"
    region = {"name": "inv", "provider": "inventory", "book": str(book)}
    settings = Settings(multi_region={"enabled": True, "regions": [region]})  # accepted by name
    reg = settings.region("inv")
    target = load_target(reg.target, reg.target_settings())
    assert isinstance(target, Target) and target.name == "inventory"
    bundle = issue_bundle()
    ref = target.deploy(bundle, None)
    assert target.fingerprint(ref) == bundle.fingerprint
    assert '"fingerprint": "' + bundle.fingerprint in book.read_text()
    target.remove(ref)
    assert target.fingerprint(ref) is None
    # its settings are checked against its table like a built-in's
    with pytest.raises(ConfigError) as info:
        load_target("inventory", {"name": "inv", "bok": "typo"})
    assert "bok" in str(info.value) and "inventory" in str(info.value)


def test_third_party_target_with_a_deploy_hook(
    inventory_dist: Path, issue_bundle: Callable[..., Bundle], tmp_path: Path
) -> None:
    out = tmp_path / "hook-ran"
    config = {
        "name": "inv",
        "book": str(tmp_path / "book.json"),
        "deploy_hook": ["/bin/sh", "-c", f'echo "$CERTQUEUE_TARGET $CERTQUEUE_TARGET_REF" > {out}'],
    }
    target = load_target("inventory", config)  # the hook's keys never reach the plugin (it would refuse them)
    bundle = issue_bundle()
    target.deploy(bundle, None)
    assert out.read_text() == f"inventory {bundle.certificate_id}\n"


def test_third_party_dns_provider_presents_through_the_core_zone_lookup(
    inventory_dist: Path, bind_resolver: Resolver, tmp_path: Path
) -> None:
    provider = load_provider("txtfile", {"directory": str(tmp_path)}, resolver=bind_resolver)
    assert isinstance(provider, DNSProvider)
    handle = provider.present("_acme-challenge.www.example.test", "v1")
    assert handle == {"zone": "example.test"}  # BIND serves example.test: found by the core lookup
    assert '"v1"' in (tmp_path / "example.test.json").read_text()
    provider.cleanup("_acme-challenge.www.example.test", "v1", handle)
    assert '"v1"' not in (tmp_path / "example.test.json").read_text()


def test_a_plugin_that_fails_to_import_is_named(inventory_dist: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_target("broken", {"name": "x"})
    message = str(info.value)
    assert "target plugin 'broken'" in message and "certqueue_inventory_missing" in message
    assert "ModuleNotFoundError" in message and isinstance(info.value.__cause__, ImportError)


def test_two_distributions_under_one_name_are_refused(inventory_dist: Path) -> None:
    other = inventory_dist / "site" / "certqueue_rival-1.0.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: certqueue-rival\nVersion: 1.0\n")
    (other / "entry_points.txt").write_text("[certqueue.targets]\ninventory = certqueue_rival:Target\n")
    plugins.rescan()  # installed into this running process
    with pytest.raises(ConfigError, match="registered more than once"):
        load_target("inventory", {"name": "x", "book": "/tmp/b"})


def test_a_class_of_the_wrong_kind_is_refused(inventory_dist: Path) -> None:
    bad = inventory_dist / "site" / "certqueue_wrong-1.0.dist-info"
    bad.mkdir()
    (bad / "METADATA").write_text("Metadata-Version: 2.1\nName: certqueue-wrong\nVersion: 1.0\n")
    # a DNS provider registered as a target
    (bad / "entry_points.txt").write_text(
        "[certqueue.targets]\nwrong = certqueue_inventory:TxtFileProvider\n"
    )
    plugins.rescan()
    with pytest.raises(ConfigError, match="is not a Target"):
        load_target("wrong", {"name": "x"})


# -- settings tables -----------------------------------------------------------------------------

TABLE = (
    Setting("token", (str,), "a credential", required=True, secret=True, env=("EXAMPLE_TOKEN",)),
    Setting("retries", (int,), "a count", default=2),
    Setting("timeout", (int, float), "seconds", default=5.0, env=("EXAMPLE_TIMEOUT",)),
    Setting("verbose", (bool,), "a switch", default=False),
)


def test_read_settings_fills_defaults_and_reads_text_as_numbers() -> None:
    s = read_settings("target", "ex", {"token": "t", "retries": "4", "verbose": "true"}, TABLE, environ={})
    assert s == {"token": "t", "retries": 4, "timeout": 5.0, "verbose": True}


def test_read_settings_environment_fallback() -> None:
    env = {"EXAMPLE_TOKEN": "from-env", "EXAMPLE_TIMEOUT": "2.5"}
    assert read_settings("target", "ex", {}, TABLE, environ=env)["token"] == "from-env"
    assert read_settings("target", "ex", {}, TABLE, environ=env)["timeout"] == 2.5
    assert read_settings("target", "ex", {"token": "given"}, TABLE, environ=env)["token"] == "given"


@pytest.mark.parametrize(
    "config, key, words",
    [
        ({}, "token", "missing token (or set EXAMPLE_TOKEN)"),
        ({"token": ""}, "token", "missing token"),
        ({"token": "t", "retries": True}, "retries", "must be int"),
        ({"token": "t", "retries": "many"}, "retries", "must be int"),
        ({"token": "t", "tiemout": 3}, "tiemout", "unknown setting 'tiemout'; known: retries, timeout"),
    ],
)
def test_read_settings_errors(config: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        read_settings("target", "ex", config, TABLE, environ={})
    assert info.value.key == key and words in str(info.value) and "target ex" in str(info.value)


def test_a_secret_of_the_wrong_type_is_not_shown() -> None:
    with pytest.raises(ConfigError) as info:
        read_settings("target", "ex", {"token": 12345678}, TABLE, environ={})
    assert "12345678" not in str(info.value)


def _builtin_tables() -> Iterator[tuple[str, str, plugins.Table]]:
    for group, entries in plugins.BUILTIN.items():
        for name in entries:
            yield group, name, plugins.table_of(group, name)


def test_every_builtin_has_a_table_with_help() -> None:
    for group, name, table in _builtin_tables():
        assert table, f"{name} declares no settings"
        for s in table:
            assert s.help, f"{name}.{s.key} has no help"


def test_every_builtin_key_is_documented() -> None:
    docs = {
        plugins.DNS_PROVIDERS: (ROOT / "docs" / "dns-providers.md").read_text(),
        plugins.TARGETS: (ROOT / "docs" / "targets.md").read_text(),
    }
    for group, name, table in _builtin_tables():
        missing = [s.key for s in table if f"{s.key}:" not in docs[group] and f"`{s.key}`" not in docs[group]]
        assert missing == [], f"{name}: {missing} not in the docs"


def test_config_show_masks_every_builtin_secret() -> None:
    """``config show`` masks by key name: every key a table marks secret is masked there."""
    from certqueue.config import LoadedSettings

    challenges: dict[str, Any] = {}
    regions = []
    for group, name, table in _builtin_tables():
        values = {s.key: f"SECRET-{name}-{s.key}" for s in table if s.secret}
        if group == plugins.DNS_PROVIDERS:
            challenges[name] = values
        else:
            regions.append({"name": f"r-{name}", "provider": name, **values})
    loaded = LoadedSettings(settings=Settings(challenges=challenges, multi_region={"regions": regions}))
    shown = repr(masked_dump(loaded))
    assert "SECRET-" not in shown


def test_a_provider_keeps_no_secret_in_its_settings_copy() -> None:
    provider = load_provider(
        "rfc2136", {"nameserver": "127.0.0.1", "tsig_key_name": "k", "tsig_secret": "c2VjcmV0LXZhbHVl"}
    )
    assert "tsig_secret" not in provider.config and "c2VjcmV0LXZhbHVl" not in repr(vars(provider))
