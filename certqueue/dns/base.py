"""The DNS provider interface (lego's two methods plus a timeout).

A provider only adds and removes TXT values at a fully qualified name. Zone lookup, CNAME following
and the propagation check live in core (``certqueue.dns.zones`` and ``certqueue.dns.propagation``),
never in a provider. Providers never import ``acme``.

The handle returned by ``present`` is JSON-serialisable and stored in the challenge row, so that a
different worker process, perhaps on another machine, can call ``cleanup`` later: nothing is kept in
process memory between the two calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar

from certqueue.errors import ConfigError

ENTRY_POINT_GROUP = "certqueue.dns_providers"

Handle = dict[str, Any]


class DNSProvider(ABC):
    #: registry name, equal to the entry-point name
    name: ClassVar[str]
    #: default (propagation timeout, polling interval) in seconds
    default_timeout: ClassVar[tuple[float, float]] = (120.0, 2.0)

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Validate the provider's settings section; missing credentials raise ConfigError here,
        at configuration time, never mid-order."""
        self.config = dict(config)

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


def provider_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_provider(name: str, config: Mapping[str, Any]) -> DNSProvider:
    """Build the provider registered under ``name``; unknown names are a ConfigError."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            return cls(config)  # type: ignore[no-any-return]
    raise ConfigError(
        f"unknown DNS provider {name!r}; known: {', '.join(provider_names())}", key="challenges.dns_provider"
    )
