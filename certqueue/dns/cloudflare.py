"""DNS-01 through the Cloudflare v4 API, with the official ``cloudflare`` SDK (v3 or later).

Owns the TXT records it creates at ``_acme-challenge`` names. Cloudflare keeps each TXT value as its
own record, so ``present`` creates one record (an identical existing one is adopted: a redelivered
task is harmless) and returns its zone and record ids as the handle; ``cleanup`` deletes that record
by id, or, with no handle, every TXT record at the name with exactly that content. Records with other
values at the same name are never touched. A record already gone is fine.

Credentials: an API token (not the global API key) with the permission **Zone / DNS / Edit**, limited
to the zones certqueue validates (Zone Resources: "Include / Specific zone"). If ``zone_id`` is not
set the token also needs **Zone / Zone / Read** to find the zone by name.

Settings::

    cloudflare:
      api_token: "<token>"       # SecretStr or str; else env CLOUDFLARE_DNS_API_TOKEN / CF_DNS_API_TOKEN
      zone_id: "<32 hex>"        # optional: else the account's zone named as the core lookup's zone
      ttl: 60                    # 1 means "automatic" to Cloudflare; 60 is its minimum otherwise
      base_url: "https://api.cloudflare.com/client/v4"   # optional; tests point it at a fake
      timeout: 30                # seconds per HTTP request
      max_retries: 2             # SDK-level retries of 429/5xx/connection errors
      propagation_timeout: 120
      polling_interval: 2

Errors: 401/403 -> ``cloudflare:auth`` (permanent); 429 -> ``cloudflare:rate_limited`` (retryable,
with Retry-After); 5xx -> ``cloudflare:unavailable``; connection trouble -> ``cloudflare:network``;
no zone -> ``cloudflare:zone_not_found``; other 4xx -> ``cloudflare:bad_request``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, NoReturn

import cloudflare

from certqueue import plugins
from certqueue.dns.base import DNSProvider, Handle
from certqueue.errors import ProviderError
from certqueue.plugins import Setting, secret_value

NAME = "cloudflare"

SETTINGS: plugins.Table = (
    Setting(
        "api_token",
        (str,),
        "API token with Zone / DNS / Edit",
        required=True,
        secret=True,
        env=("CLOUDFLARE_DNS_API_TOKEN", "CF_DNS_API_TOKEN"),
    ),
    Setting("zone_id", (str,), "skip the zone lookup: write into this zone (32 hex)"),
    Setting("base_url", (str,), "API base URL (tests point it at a fake)"),
    Setting("timeout", (int, float), "seconds per HTTP request", default=30.0),
    Setting("max_retries", (int,), "SDK retries of 429, 5xx and connection errors", default=2),
)
_IDENTICAL_RECORD = 81058  # "An identical record already exists."


class CloudflareProvider(DNSProvider):
    name: ClassVar[str] = NAME
    default_timeout: ClassVar[tuple[float, float]] = (120.0, 2.0)

    settings: ClassVar[plugins.Table] = SETTINGS

    def configure(self, s: dict[str, Any]) -> None:
        self._zone_id: str | None = str(s["zone_id"]) if s["zone_id"] else None
        kwargs: dict[str, Any] = {
            "api_token": secret_value(s["api_token"]),
            "timeout": float(s["timeout"]),
            "max_retries": int(s["max_retries"]),
        }
        if s["base_url"]:
            kwargs["base_url"] = str(s["base_url"])
        self._client = cloudflare.Cloudflare(**kwargs)

    def __repr__(self) -> str:
        return f"CloudflareProvider(zone_id={self._zone_id!r})"

    # -- interface ---------------------------------------------------------------------------

    def present(self, fqdn: str, value: str) -> Handle:
        name = _name(fqdn)
        zone_id = self._zone_id or self._zone_id_for(name)
        try:
            record = self._client.dns.records.create(
                zone_id=zone_id, type="TXT", name=name, content=value, ttl=self.ttl
            )
            record_id = record.id if record is not None else None
        except cloudflare.BadRequestError as exc:
            if _IDENTICAL_RECORD not in _codes(exc):
                _raise(exc, f"creating TXT {name}")
            record_id = next((r.id for r in self._records(zone_id, name, value)), None)
        except cloudflare.APIError as exc:
            _raise(exc, f"creating TXT {name}")
        if not record_id:
            raise ProviderError(
                NAME,
                f"created TXT {name} but got no record id",
                retryable=True,
                reason=f"{NAME}:bad_response",
            )
        return {"provider": NAME, "zone_id": zone_id, "record_id": record_id, "fqdn": name}

    def cleanup(self, fqdn: str, value: str, handle: Handle | None) -> None:
        name = _name(fqdn)
        handle = handle or {}
        zone_id = handle.get("zone_id") or self._zone_id or self._zone_id_for(name)
        ids = (
            [handle["record_id"]]
            if handle.get("record_id")
            else [r.id for r in self._records(zone_id, name, value)]
        )
        for record_id in ids:
            try:
                self._client.dns.records.delete(record_id, zone_id=zone_id)
            except cloudflare.NotFoundError:
                continue  # already gone: cleanup is idempotent
            except cloudflare.APIError as exc:
                _raise(exc, f"deleting TXT {name}")

    # -- internals ---------------------------------------------------------------------------

    def _records(self, zone_id: str, name: str, value: str) -> Iterator[Any]:
        try:
            page = self._client.dns.records.list(
                zone_id=zone_id, type="TXT", name={"exact": name}, content={"exact": value}, per_page=100
            )
            # The filters are server-side; check again in case an API version ignores one of them.
            yield from (r for r in page if r.name == name and r.content == value and r.type == "TXT")
        except cloudflare.APIError as exc:
            _raise(exc, f"listing TXT {name}")

    def _zone_id_for(self, name: str) -> str:
        """The id of the account's zone named as the zone the core lookup finds."""
        zone = self.zone_of(name)
        try:
            zones = self._client.zones.list(name=zone, per_page=5)
        except cloudflare.APIError as exc:
            _raise(exc, f"looking up zone {zone}")
        for z in zones.result or []:
            if z.name == zone:
                return str(z.id)
        raise ProviderError(
            NAME, f"zone {zone} is not in this account (for {name})", reason=f"{NAME}:zone_not_found"
        )


def _name(fqdn: str) -> str:
    return fqdn.rstrip(".").lower()


def _codes(exc: cloudflare.APIError) -> list[int]:
    body = exc.body
    errors = body.get("errors") if isinstance(body, dict) else body
    if not isinstance(errors, list):
        return []
    return [e["code"] for e in errors if isinstance(e, dict) and isinstance(e.get("code"), int)]


def _raise(exc: cloudflare.APIError, doing: str) -> NoReturn:
    """Map an SDK error to a ProviderError with a stable reason (never the raw SDK text)."""
    codes = ",".join(str(c) for c in _codes(exc)) or "-"
    if isinstance(exc, cloudflare.APITimeoutError | cloudflare.APIConnectionError):
        raise ProviderError(
            NAME,
            f"{doing}: cannot reach the API ({type(exc).__name__})",
            retryable=True,
            reason=f"{NAME}:network",
        ) from exc
    status = getattr(exc, "status_code", 0)
    if isinstance(exc, cloudflare.AuthenticationError | cloudflare.PermissionDeniedError):
        raise ProviderError(
            NAME, f"{doing}: API token rejected (HTTP {status}, codes {codes})", reason=f"{NAME}:auth"
        ) from exc
    if isinstance(exc, cloudflare.RateLimitError):
        retry_after = None
        header = exc.response.headers.get("retry-after")
        if header:
            try:
                retry_after = float(header)
            except ValueError:
                retry_after = None
        raise ProviderError(
            NAME,
            f"{doing}: rate limited (HTTP 429)",
            retryable=True,
            reason=f"{NAME}:rate_limited",
            retry_after=retry_after,
        ) from exc
    if isinstance(exc, cloudflare.InternalServerError):
        raise ProviderError(
            NAME, f"{doing}: API unavailable (HTTP {status})", retryable=True, reason=f"{NAME}:unavailable"
        ) from exc
    if isinstance(exc, cloudflare.NotFoundError):
        raise ProviderError(
            NAME, f"{doing}: not found (HTTP 404, codes {codes})", reason=f"{NAME}:not_found"
        ) from exc
    raise ProviderError(
        NAME, f"{doing}: request refused (HTTP {status}, codes {codes})", reason=f"{NAME}:bad_request"
    ) from exc
