"""DNS-01 through Azure DNS (public zones), with ``azure-mgmt-dns`` and ``azure-identity``.

Owns the TXT values it adds at ``_acme-challenge`` names in one resource group's DNS zones. Azure keeps
all values of a name in one record set with an etag, so both calls are compare-and-swap: ``present``
GETs the set and PUTs it back with the new value added (``If-Match: <etag>``, or ``If-None-Match: *``
when creating); ``cleanup`` PUTs it back without the value, or DELETEs the set (``If-Match``) when
nothing else is left. A 412 (someone else changed the set in between) re-reads and tries again, a few
times. Other values at the name are never lost.

Credentials: a service principal (``tenant_id``, ``client_id``, ``client_secret``) through
``ClientSecretCredential``, or ``use_default_credential: true`` for ``DefaultAzureCredential`` (managed
identity, workload identity, environment). Permissions: the built-in role **DNS Zone Contributor** on
the zone (or a custom role with ``Microsoft.Network/dnsZones/read``, ``.../dnsZones/TXT/read``,
``.../TXT/write``, ``.../TXT/delete``), scoped to the zone, not the subscription.

Settings::

    azure:
      subscription_id: 00000000-0000-0000-0000-000000000000
      resource_group: dns
      zone_name: example.com        # optional: longest-suffix match over the group's zones otherwise
      tenant_id: 00000000-...
      client_id: 00000000-...
      client_secret: "<secret>"     # SecretStr or str
      ttl: 60
      base_url: https://management.azure.com          # optional (sovereign clouds, tests)
      authority_host: https://login.microsoftonline.com   # optional (sovereign clouds, tests)
      connection_verify: /path/ca.pem                 # optional CA bundle (tests)
      timeout: 30
      max_retries: 3
      propagation_timeout: 180
      polling_interval: 5

Errors: rejected credentials or 403 -> ``azure:auth`` (permanent); 429 -> ``azure:rate_limited``;
5xx -> ``azure:unavailable``; connection trouble -> ``azure:network`` (retryable); no zone ->
``azure:zone_not_found``; etag conflicts that persist -> ``azure:conflict`` (retryable).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn

from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.mgmt.dns import DnsManagementClient
from azure.mgmt.dns.models import RecordSet, TxtRecord

from certqueue.dns.base import DNSProvider, Handle
from certqueue.errors import ConfigError, ProviderError

NAME = "azure"

_KEYS = {
    "propagation_timeout",
    "polling_interval",
    "ttl",
    "subscription_id",
    "resource_group",
    "zone_name",
    "tenant_id",
    "client_id",
    "client_secret",
    "use_default_credential",
    "base_url",
    "authority_host",
    "connection_verify",
    "timeout",
    "max_retries",
}
_CAS_ATTEMPTS = 5


def _secret(value: Any) -> str:
    return str(value.get_secret_value() if hasattr(value, "get_secret_value") else value)


def _int(value: Any, default: int) -> int:
    """A count from settings; None or "" means the default (0 is a real value: no retries)."""
    return default if value is None or value == "" else int(value)


class AzureDNSProvider(DNSProvider):
    name: ClassVar[str] = NAME
    default_timeout: ClassVar[tuple[float, float]] = (180.0, 5.0)

    def __init__(self, config: Mapping[str, Any], *, credential: TokenCredential | None = None) -> None:
        """``credential`` overrides the one built from settings (any azure-core TokenCredential)."""
        super().__init__(config)
        for key in sorted(config):
            if key not in _KEYS:
                raise ConfigError(f"dns provider {NAME}: unknown setting {key!r}", key=f"{NAME}.{key}")
        required = ["subscription_id", "resource_group"]
        if credential is None and not config.get("use_default_credential"):
            required += ["tenant_id", "client_id", "client_secret"]
        for key in required:
            if not _secret(config.get(key) or ""):
                raise ConfigError(f"dns provider {NAME}: missing {key}", key=f"{NAME}.{key}")
        self._rg = str(config["resource_group"])
        self._zone = str(config["zone_name"]).rstrip(".").lower() if config.get("zone_name") else None
        self._ttl = int(config.get("ttl") or 60)
        timeout = float(config.get("timeout") or 30.0)
        transport: dict[str, Any] = {"connection_timeout": timeout, "read_timeout": timeout}
        if config.get("connection_verify") is not None:
            transport["connection_verify"] = config["connection_verify"]
        if credential is None:
            credential = _build_credential(config, transport)
        client_kwargs: dict[str, Any] = {"retry_total": _int(config.get("max_retries"), 3), **transport}
        if config.get("base_url"):
            client_kwargs["base_url"] = str(config["base_url"])
        self._client = DnsManagementClient(credential, str(config["subscription_id"]), **client_kwargs)
        self.config.pop("client_secret", None)

    def __repr__(self) -> str:
        return f"AzureDNSProvider(resource_group={self._rg!r}, zone={self._zone!r})"

    # -- interface ---------------------------------------------------------------------------

    def present(self, fqdn: str, value: str) -> Handle:
        name = _name(fqdn)
        zone = self._zone or self._find_zone(name)
        relative = _relative(name, zone)
        for _ in range(_CAS_ATTEMPTS):
            current = self._get(zone, relative)
            if current is None:
                new = RecordSet(ttl=self._ttl, txt_records=[TxtRecord(value=[value])])
                if self._put(zone, relative, new, if_none_match="*"):
                    break
                continue
            values = _values(current)
            if value in values:
                break
            new = RecordSet(
                ttl=current.ttl or self._ttl, txt_records=[TxtRecord(value=[v]) for v in [*values, value]]
            )
            if self._put(zone, relative, new, if_match=current.etag):
                break
        else:
            raise ProviderError(
                NAME,
                f"TXT {relative}.{zone} kept changing under us",
                retryable=True,
                reason=f"{NAME}:conflict",
            )
        return {
            "provider": NAME,
            "resource_group": self._rg,
            "zone": zone,
            "relative": relative,
            "fqdn": name,
        }

    def cleanup(self, fqdn: str, value: str, handle: Handle | None) -> None:
        name = _name(fqdn)
        handle = handle or {}
        zone = handle.get("zone") or self._zone or self._find_zone(name)
        relative = handle.get("relative") or _relative(name, zone)
        for _ in range(_CAS_ATTEMPTS):
            current = self._get(zone, relative)
            if current is None:
                return
            values = _values(current)
            if value not in values:
                return
            rest = [v for v in values if v != value]
            if rest:
                new = RecordSet(
                    ttl=current.ttl or self._ttl, txt_records=[TxtRecord(value=[v]) for v in rest]
                )
                done = self._put(zone, relative, new, if_match=current.etag)
            else:
                done = self._delete(zone, relative, if_match=current.etag)
            if done:
                return
        raise ProviderError(
            NAME, f"TXT {relative}.{zone} kept changing under us", retryable=True, reason=f"{NAME}:conflict"
        )

    # -- internals ---------------------------------------------------------------------------

    def _get(self, zone: str, relative: str) -> RecordSet | None:
        try:
            return self._client.record_sets.get(self._rg, zone, relative, "TXT")
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            _raise(exc, f"reading TXT {relative}.{zone}")

    def _put(
        self,
        zone: str,
        relative: str,
        record_set: RecordSet,
        *,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> bool:
        """True when written; False on a lost compare-and-swap (412)."""
        try:
            self._client.record_sets.create_or_update(
                self._rg, zone, relative, "TXT", record_set, if_match=if_match, if_none_match=if_none_match
            )
            return True
        except HttpResponseError as exc:
            if exc.status_code == 412:
                return False
            _raise(exc, f"writing TXT {relative}.{zone}")
        except AzureError as exc:
            _raise(exc, f"writing TXT {relative}.{zone}")

    def _delete(self, zone: str, relative: str, *, if_match: str | None) -> bool:
        try:
            self._client.record_sets.delete(self._rg, zone, relative, "TXT", if_match=if_match)
            return True
        except ResourceNotFoundError:
            return True
        except HttpResponseError as exc:
            if exc.status_code == 412:
                return False
            _raise(exc, f"deleting TXT {relative}.{zone}")
        except AzureError as exc:
            _raise(exc, f"deleting TXT {relative}.{zone}")

    def _find_zone(self, name: str) -> str:
        best: str | None = None
        try:
            for zone in self._client.zones.list_by_resource_group(self._rg):
                zname = str(zone.name).rstrip(".").lower()
                if (name == zname or name.endswith("." + zname)) and (best is None or len(zname) > len(best)):
                    best = zname
        except AzureError as exc:
            _raise(exc, f"listing DNS zones of resource group {self._rg}")
        if best is None:
            raise ProviderError(
                NAME,
                f"no DNS zone in resource group {self._rg} holds {name}",
                reason=f"{NAME}:zone_not_found",
            )
        return best


def _build_credential(config: Mapping[str, Any], transport: dict[str, Any]) -> TokenCredential:
    from azure.identity import ClientSecretCredential, DefaultAzureCredential

    kwargs: dict[str, Any] = dict(transport)
    if config.get("authority_host"):
        kwargs["authority"] = str(config["authority_host"])
        # a non-public authority (sovereign cloud proxy, test fake) is not in Entra's discovery list
        kwargs["disable_instance_discovery"] = True
    if config.get("use_default_credential") and not config.get("client_secret"):
        return DefaultAzureCredential(**kwargs)
    return ClientSecretCredential(
        str(config["tenant_id"]), str(config["client_id"]), _secret(config["client_secret"]), **kwargs
    )


def _name(fqdn: str) -> str:
    return fqdn.rstrip(".").lower()


def _relative(name: str, zone: str) -> str:
    if name == zone:
        return "@"
    if not name.endswith("." + zone):
        raise ProviderError(NAME, f"{name} is not inside zone {zone}", reason=f"{NAME}:zone_not_found")
    return name[: -len(zone) - 1]


def _values(record_set: RecordSet) -> list[str]:
    return ["".join(r.value or []) for r in record_set.txt_records or []]


def _raise(exc: AzureError, doing: str) -> NoReturn:
    """Map an Azure SDK error to a ProviderError with a stable reason (never the raw SDK text)."""
    if isinstance(exc, ClientAuthenticationError):
        raise ProviderError(NAME, f"{doing}: credentials rejected", reason=f"{NAME}:auth") from exc
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        raise ProviderError(
            NAME,
            f"{doing}: cannot reach Azure ({type(exc).__name__})",
            retryable=True,
            reason=f"{NAME}:network",
        ) from exc
    status = getattr(exc, "status_code", None) or 0
    code = getattr(getattr(exc, "error", None), "code", None) or status
    if status in (401, 403):
        raise ProviderError(NAME, f"{doing}: access denied ({code})", reason=f"{NAME}:auth") from exc
    if status == 429:
        retry_after = None
        response = getattr(exc, "response", None)
        header = response.headers.get("Retry-After") if response is not None else None
        if header:
            try:
                retry_after = float(header)
            except ValueError:
                retry_after = None
        raise ProviderError(
            NAME,
            f"{doing}: throttled (429)",
            retryable=True,
            reason=f"{NAME}:rate_limited",
            retry_after=retry_after,
        ) from exc
    if status >= 500:
        raise ProviderError(
            NAME, f"{doing}: service unavailable ({code})", retryable=True, reason=f"{NAME}:unavailable"
        ) from exc
    if isinstance(exc, ResourceNotFoundError):
        raise ProviderError(NAME, f"{doing}: not found ({code})", reason=f"{NAME}:zone_not_found") from exc
    raise ProviderError(NAME, f"{doing}: request failed ({code})", reason=f"{NAME}:error") from exc
