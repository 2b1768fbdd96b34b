"""The DNS provider interface (lego's two methods plus a timeout).

A provider only adds and removes TXT values at a fully qualified name. Zone lookup, CNAME following
and the propagation check live in core (``certqueue.dns.zones`` and ``certqueue.dns.propagation``),
never in a provider: a provider that needs to know the zone asks ``zone_of``, which is the core
lookup (SOA walk through the configured resolvers) with its errors worded for the provider.
Providers never import ``acme``.

Every provider has the same constructor, this class's: ``Provider(config, *, resolver=None)``.
``config`` is checked against the provider's ``settings`` table (plus ``COMMON``) before the
provider's ``configure`` sees the values; ``resolver`` is where zone lookups go (the settings'
``challenges.dns_resolvers`` when not given).

The handle returned by ``present`` is JSON-serialisable and stored in the challenge row, so that a
different worker process, perhaps on another machine, can call ``cleanup`` later: nothing is kept in
process memory between the two calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from certqueue import plugins
from certqueue.dns.zones import DNSLookupError, Resolver, ZoneNotFound, configured_resolver, find_zone
from certqueue.errors import ProviderError
from certqueue.plugins import Setting

ENTRY_POINT_GROUP = plugins.DNS_PROVIDERS

Handle = dict[str, Any]

_NUMBER = (int, float)

#: settings every provider takes
COMMON: plugins.Table = (
    Setting("propagation_timeout", _NUMBER, "seconds to wait until every nameserver has the value"),
    Setting("polling_interval", _NUMBER, "seconds between two propagation checks"),
    Setting("ttl", (int,), "TTL of the TXT records written", default=60),
)


class DNSProvider(ABC):
    #: registry name, equal to the entry-point name
    name: ClassVar[str]
    #: the provider's own settings (``COMMON`` is added); read by validation and the docs
    settings: ClassVar[plugins.Table] = ()
    #: default (propagation timeout, polling interval) in seconds
    default_timeout: ClassVar[tuple[float, float]] = (120.0, 2.0)

    def __init__(self, config: Mapping[str, Any], *, resolver: Resolver | None = None) -> None:
        """Validate the provider's settings; unknown keys and missing credentials raise ConfigError
        here, at configuration time, never mid-order."""
        values = plugins.read_settings("dns provider", self.name, config, (*COMMON, *self.settings))
        self._resolver = resolver
        self.ttl = int(values["ttl"])
        secrets = plugins.secret_keys(self.settings)
        #: the settings without their secrets (a secret lives only where ``configure`` puts it)
        self.config = {k: v for k, v in values.items() if k not in secrets and v is not None}
        self.configure(values)

    @abstractmethod
    def configure(self, settings: dict[str, Any]) -> None:
        """Build the client from the validated settings (every key of the table, defaults filled
        in); raise ConfigError for values that cannot work."""

    @abstractmethod
    def present(self, fqdn: str, value: str) -> Handle:
        """Add ``value`` to the TXT rrset at ``fqdn`` (other values stay). Returns a JSON handle."""

    @abstractmethod
    def cleanup(self, fqdn: str, value: str, handle: Handle | None) -> None:
        """Remove ``value`` from the TXT rrset at ``fqdn``; other values stay. Idempotent."""

    def timeout(self) -> tuple[float, float]:
        """(propagation timeout, polling interval) in seconds."""
        t = self.config.get("propagation_timeout")
        p = self.config.get("polling_interval")
        return (float(t) if t else self.default_timeout[0], float(p) if p else self.default_timeout[1])

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = configured_resolver()
        return self._resolver

    def zone_of(self, fqdn: str) -> str:
        """The apex of the zone holding ``fqdn``, by the core lookup; errors name this provider."""
        try:
            return find_zone(fqdn, self.resolver)
        except ZoneNotFound as exc:
            raise ProviderError(
                self.name, f"no DNS zone found for {fqdn.rstrip('.')}", reason=f"{self.name}:zone_not_found"
            ) from exc
        except DNSLookupError as exc:
            raise ProviderError(
                self.name,
                f"zone lookup for {fqdn.rstrip('.')} failed",
                retryable=True,
                reason=f"{self.name}:zone_lookup_failed",
            ) from exc


def provider_names() -> list[str]:
    return plugins.names(ENTRY_POINT_GROUP)


def load_provider(name: str, config: Mapping[str, Any], *, resolver: Resolver | None = None) -> DNSProvider:
    """Build the provider registered under ``name``; an unknown name or a plugin that does not import
    is a ConfigError naming it."""
    cls = plugins.load(ENTRY_POINT_GROUP, name, base=DNSProvider, key="challenges.dns_provider")
    provider: DNSProvider = cls(config, resolver=resolver)
    return provider
