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
      zone_name: example.com        # optional: else the zone the core lookup finds (SOA walk)
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

from certqueue import plugins
from certqueue.dns.base import DNSProvider, Handle
from certqueue.errors import ConfigError, ProviderError
from certqueue.plugins import Setting, secret_value

NAME = "azure"

SETTINGS: plugins.Table = (
    Setting(
        "subscription_id",
        (str,),
        "subscription of the DNS zones",
        required=True,
        env=("AZURE_SUBSCRIPTION_ID",),
    ),
    Setting(
        "resource_group",
        (str,),
        "resource group of the DNS zones",
        required=True,
        env=("AZURE_RESOURCE_GROUP",),
    ),
    Setting("zone_name", (str,), "skip the zone lookup: write into this zone", env=("AZURE_ZONE_NAME",)),
    Setting("tenant_id", (str,), "service principal: tenant", env=("AZURE_TENANT_ID",)),
    Setting("client_id", (str,), "service principal: application (client) id", env=("AZURE_CLIENT_ID",)),
    Setting(
        "client_secret", (str,), "service principal: client secret", secret=True, env=("AZURE_CLIENT_SECRET",)
    ),
    Setting(
        "use_default_credential",
        (bool,),
        "DefaultAzureCredential instead of a service principal",
        default=False,
    ),
    Setting("base_url", (str,), "Resource Manager endpoint (sovereign clouds, tests)"),
    Setting("authority_host", (str,), "Entra ID authority (sovereign clouds, tests)"),
    Setting("connection_verify", (str, bool), "CA bundle path, or false (tests)"),
    Setting("timeout", (int, float), "seconds per HTTP request", default=30.0),
    Setting("max_retries", (int,), "SDK retries", default=3),
)
_CAS_ATTEMPTS = 5


class AzureDNSProvider(DNSProvider):
    name: ClassVar[str] = NAME
    default_timeout: ClassVar[tuple[float, float]] = (180.0, 5.0)

    settings: ClassVar[plugins.Table] = SETTINGS

    def configure(self, s: dict[str, Any]) -> None:
        if not s["use_default_credential"]:
            for key in ("tenant_id", "client_id", "client_secret"):
                if not secret_value(s[key]):
                    raise ConfigError(
                        f"dns provider {NAME}: missing {key} (or set use_default_credential)",
                        key=f"{NAME}.{key}",
                    )
        self._rg = str(s["resource_group"])
        self._zone = str(s["zone_name"]).rstrip(".").lower() if s["zone_name"] else None
        timeout = float(s["timeout"])
        transport: dict[str, Any] = {"connection_timeout": timeout, "read_timeout": timeout}
        if s["connection_verify"] is not None:
            transport["connection_verify"] = s["connection_verify"]
        client_kwargs: dict[str, Any] = {"retry_total": int(s["max_retries"]), **transport}
        if s["base_url"]:
            client_kwargs["base_url"] = str(s["base_url"])
        self._client = DnsManagementClient(
            _build_credential(s, transport), str(s["subscription_id"]), **client_kwargs
        )

    def __repr__(self) -> str:
        return f"AzureDNSProvider(resource_group={self._rg!r}, zone={self._zone!r})"

    # -- interface ---------------------------------------------------------------------------

    def present(self, fqdn: str, value: str) -> Handle:
        name = _name(fqdn)
        zone = self._zone or self.zone_of(name)
        relative = _relative(name, zone)
        for _ in range(_CAS_ATTEMPTS):
            current = self._get(zone, relative)
            if current is None:
                new = RecordSet(ttl=self.ttl, txt_records=[TxtRecord(value=[value])])
                if self._put(zone, relative, new, if_none_match="*"):
                    break
                continue
            values = _values(current)
            if value in values:
                break
            new = RecordSet(
                ttl=current.ttl or self.ttl, txt_records=[TxtRecord(value=[v]) for v in [*values, value]]
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
        zone = handle.get("zone") or self._zone or self.zone_of(name)
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
                new = RecordSet(ttl=current.ttl or self.ttl, txt_records=[TxtRecord(value=[v]) for v in rest])
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


def _build_credential(config: dict[str, Any], transport: dict[str, Any]) -> TokenCredential:
    from azure.identity import ClientSecretCredential, DefaultAzureCredential

    kwargs: dict[str, Any] = dict(transport)
    if config.get("authority_host"):
        kwargs["authority"] = str(config["authority_host"])
        # a non-public authority (sovereign cloud proxy, test fake) is not in Entra's discovery list
        kwargs["disable_instance_discovery"] = True
    if config.get("use_default_credential") and not config.get("client_secret"):
        return DefaultAzureCredential(**kwargs)
    return ClientSecretCredential(
        str(config["tenant_id"]),
        str(config["client_id"]),
        secret_value(config["client_secret"]) or "",
        **kwargs,
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
