"""Plugins: DNS providers and deployment targets, found by entry point, with declared settings.

Owns no state. Two things every plugin shares are written here once:

* the registry: a plugin is a class registered under a name in the entry-point group
  ``certqueue.dns_providers`` or ``certqueue.targets`` (``pip install`` of a package that declares one
  adds it). The built-in plugins are registered the same way in certqueue's own ``pyproject.toml``;
  ``BUILTIN`` repeats them (a test keeps the two equal) so that a checkout run without installed
  metadata still finds them. An unknown name, and a plugin that fails to import, are ``ConfigError``s
  that name it (and, for an unknown one, list the known names).
* the settings table: each plugin declares its settings as a tuple of ``Setting`` (key, accepted
  types, required, secret, environment-variable fallback, help); ``read_settings`` validates a
  settings mapping against it, and the docs and their tests read the same table.

This module imports nothing heavy: settings are read by every process, plugins only by the pools
that use them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from certqueue.errors import ConfigError

DNS_PROVIDERS = "certqueue.dns_providers"
TARGETS = "certqueue.targets"

#: what each group's plugins are called in messages
KIND = {DNS_PROVIDERS: "dns provider", TARGETS: "target"}

#: the built-in plugins, exactly as pyproject.toml registers them (tests/unit/test_plugins.py)
BUILTIN: dict[str, dict[str, str]] = {
    DNS_PROVIDERS: {
        "rfc2136": "certqueue.dns.rfc2136:RFC2136Provider",
        "route53": "certqueue.dns.route53:Route53Provider",
        "cloudflare": "certqueue.dns.cloudflare:CloudflareProvider",
        "azure": "certqueue.dns.azure:AzureDNSProvider",
    },
    TARGETS: {
        "local": "certqueue.targets.local:LocalFilesTarget",
        "aws_acm": "certqueue.targets.aws_acm:AWSACMTarget",
        "azure_keyvault": "certqueue.targets.azure_keyvault:AzureKeyVaultTarget",
        "gcp_certmanager": "certqueue.targets.gcp_certmanager:GCPCertManagerTarget",
    },
}


@functools.lru_cache(maxsize=16)
def _scan(group: str, path: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((ep.name, ep.value) for ep in entry_points(group=group))


def installed(group: str) -> tuple[tuple[str, str], ...]:
    """(name, ``module:attribute``) of every entry point of ``group``. Reading the metadata of every
    installed distribution takes milliseconds and settings are validated again every few seconds,
    so the answer is kept per ``sys.path``; ``rescan()`` forgets it."""
    return _scan(group, tuple(sys.path))


def rescan() -> None:
    """Forget what ``installed`` found (a package was installed into the running process)."""
    _scan.cache_clear()


def registered(group: str) -> dict[str, str]:
    """name -> ``module:attribute`` of every plugin of ``group``: the built-ins and every entry point
    (two different objects under one name are refused when loaded)."""
    found = dict(BUILTIN.get(group, {}))
    for name, value in installed(group):
        found.setdefault(name, value)
    return found


def names(group: str) -> list[str]:
    return sorted(registered(group))


def _candidates(group: str, name: str) -> list[str]:
    values = [value for n, value in installed(group) if n == name]
    if not values and name in BUILTIN.get(group, {}):
        values = [BUILTIN[group][name]]
    return sorted(set(values))


def load(group: str, name: str, *, base: type | None = None, key: str | None = None) -> Any:
    """The class registered as ``name`` in ``group`` (a subclass of ``base`` when given).

    ConfigError when no plugin has that name (the message lists the known ones), when two
    distributions register different objects under it, when the plugin fails to import (the
    message names the plugin and the import error; the cause is chained) or is not a ``base``."""
    kind = KIND.get(group, "plugin")
    values = _candidates(group, name)
    if not values:
        raise ConfigError(f"unknown {kind} {name!r}; known: {', '.join(names(group)) or '(none)'}", key=key)
    if len(values) > 1:
        raise ConfigError(
            f"{kind} {name!r} is registered more than once ({', '.join(values)}); uninstall one", key=key
        )
    ep = EntryPoint(name=name, value=values[0], group=group)
    try:
        cls = ep.load()
    except Exception as exc:  # an ImportError, or anything the plugin's module raised on import
        raise ConfigError(
            f"{kind} plugin {name!r} ({values[0]}) failed to import: {type(exc).__name__}: {exc}", key=key
        ) from exc
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{kind} plugin {name!r} ({values[0]}) is not a {base.__name__}", key=key)
    return cls


# --- settings tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One key of a plugin's settings.

    ``types``: accepted Python types (``bool`` is never taken for a number unless listed);
    ``required``: no default, missing is a ConfigError at construction; ``secret``: a credential, never
    in a message (a pydantic ``SecretStr`` is accepted and unwrapped); ``env``: variables read, in order, when
    the key is absent from the settings (lego's names, so existing deployments carry over);
    ``default``: the value when absent (and no variable is set)."""

    key: str
    types: tuple[type, ...]
    help: str
    required: bool = False
    default: Any = None
    secret: bool = False
    env: tuple[str, ...] = ()


Table = tuple[Setting, ...]


def secret_value(value: Any) -> str | None:
    """The plain text of a secret given as pydantic ``SecretStr`` or ``str`` (None stays None)."""
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    if callable(getter):
        return str(getter())
    return str(value)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _from_text(spec: Setting, text: str) -> Any:
    """A number or a bool written as text (an environment variable, ``--set k=v``); None: not one."""
    for t in (int, float):
        if t in spec.types:
            try:
                return t(text)
            except ValueError:
                continue
    if bool in spec.types and text.strip().lower() in (*_TRUE, *_FALSE):
        return text.strip().lower() in _TRUE
    return None


def read_settings(
    kind: str,
    name: str,
    config: Mapping[str, Any],
    table: Iterable[Setting],
    *,
    ignore: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Validate ``config`` against ``table``; returns every key of the table, defaults filled in.

    Unknown keys (other than ``ignore``), a key given twice (as itself and an ``aliases`` spelling),
    wrong types and missing required keys are ConfigErrors naming the plugin and the key; a secret's
    value never appears in a message. An absent key is read from its environment variables first.
    Empty strings count as absent (an unset ``${VAR}`` in YAML)."""
    where = f"{kind} {name}"
    specs = {s.key: s for s in table}
    aliases = aliases or {}
    skip = set(ignore)
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, value in config.items():
        if key in skip:
            continue
        canonical = aliases.get(key, key)
        spec = specs.get(canonical)
        if spec is None:
            known = ", ".join(sorted(set(specs) | set(aliases)))
            raise ConfigError(f"{where}: unknown setting {key!r}; known: {known}", source=where, key=key)
        if canonical in values:
            raise ConfigError(
                f"{where}: {key!r} given twice (as {canonical!r} and an alias)", source=where, key=key
            )
        if isinstance(value, str) and str not in spec.types:
            value = _from_text(spec, value) if value.strip() else None
            if value is None and config[key].strip():
                wanted = " or ".join(t.__name__ for t in spec.types)
                raise ConfigError(f"{where}: {key!r} must be {wanted}", source=where, key=key)
        if value is not None and not (spec.secret and hasattr(value, "get_secret_value")):
            if not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types):
                wanted = " or ".join(t.__name__ for t in spec.types)
                raise ConfigError(
                    f"{where}: {key!r} must be {wanted}, not {type(value).__name__}", source=where, key=key
                )
        values[canonical] = value
    for spec in specs.values():
        value = values.get(spec.key)
        if value is None or (isinstance(value, str) and value == "") or secret_value(value) == "":
            text = next((environ[v] for v in spec.env if environ.get(v)), None)
            value = text if text is None or str in spec.types else _from_text(spec, text)
        if value is None:
            if spec.required:
                hint = f" (or set {' or '.join(spec.env)})" if spec.env else ""
                raise ConfigError(f"{where}: missing {spec.key}{hint}", source=where, key=spec.key)
            value = spec.default
        values[spec.key] = value
    return values


def secret_keys(table: Iterable[Setting]) -> frozenset[str]:
    return frozenset(s.key for s in table if s.secret)


def table_of(group: str, name: str) -> Table:
    """The settings table of a registered plugin (imports it)."""
    cls = load(group, name)
    return tuple(getattr(cls, "settings", ()))
