"""DNS-01 through AWS Route 53, with boto3.

Owns the TXT values it adds at ``_acme-challenge`` names in one account's public hosted zones.
Route 53 keeps all values of a name in one rrset, so ``present`` reads the rrset and UPSERTs the union
of the values already there and the new one; ``cleanup`` rewrites it without the value, or DELETEs it
(with the exact current values, as Route 53 requires) when nothing else is left. Both are idempotent.
``present`` then waits, boundedly, for the change to be INSYNC (``get_change``); the propagation check
in core is what decides visibility.

Route 53 has no compare-and-swap on an rrset: two workers writing the *same* name at the *same*
moment can lose a value. The pipeline presents all values of one name from one task, which avoids
that; a lost value shows up as "not visible" and the retry presents it again.

Credentials: an access key (``access_key_id`` + ``secret_access_key``, optionally ``session_token``),
or ``use_default_credentials: true`` for boto3's own chain (instance profile, IRSA, env, SSO).
Permissions: ``deploy/iam/route53-dns01-policy.json`` (list zones, read record sets, get change, and
change only TXT records named ``_acme-challenge.*``). Set ``hosted_zone_id`` to skip the zone search.

Settings::

    route53:
      access_key_id: AKIA...
      secret_access_key: "<secret>"   # SecretStr or str
      region: us-east-1
      hosted_zone_id: Z0123456789ABC   # optional; longest-suffix match over the account's zones otherwise
      ttl: 60
      insync_timeout: 60               # seconds to wait for INSYNC in present (0: do not wait)
      endpoint_url: http://127.0.0.1:5000   # optional (moto in tests)
      timeout: 20                      # seconds per HTTP request
      max_retries: 3
      propagation_timeout: 180
      polling_interval: 5

Errors: bad or expired credentials, access denied -> ``route53:auth`` (permanent); throttling,
PriorRequestNotComplete and 5xx -> ``route53:rate_limited`` / ``route53:unavailable`` (retryable);
connection trouble -> ``route53:network``; no hosted zone -> ``route53:zone_not_found``; a rejected
change batch -> ``route53:invalid_change``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn

import boto3
import botocore.config
import botocore.exceptions

from certqueue.dns.base import DNSProvider, Handle
from certqueue.errors import ConfigError, ProviderError

NAME = "route53"

_KEYS = {
    "propagation_timeout",
    "polling_interval",
    "ttl",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "region",
    "hosted_zone_id",
    "endpoint_url",
    "timeout",
    "max_retries",
    "insync_timeout",
    "use_default_credentials",
}
_AUTH_CODES = {
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "ExpiredToken",
    "ExpiredTokenException",
    "MissingAuthenticationToken",
    "AuthFailure",
    "IncompleteSignature",
}
_THROTTLE_CODES = {"Throttling", "ThrottlingException", "PriorRequestNotComplete", "RequestLimitExceeded"}
_TXT_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_INSYNC_POLL = 2.0


def _secret(value: Any) -> str:
    return str(value.get_secret_value() if hasattr(value, "get_secret_value") else value)


def _int(value: Any, default: int) -> int:
    """A count from settings; None or "" means the default (0 is a real value: no retries)."""
    return default if value is None or value == "" else int(value)


def _decode_txt(value: str) -> str:
    """``"abc" "def"`` -> ``abcdef`` (Route 53 returns TXT data in zone-file quoting)."""
    parts = _TXT_STRING.findall(value)
    if not parts:
        return value
    return "".join(re.sub(r"\\(.)", r"\1", p) for p in parts)


def _encode_txt(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Route53Provider(DNSProvider):
    name: ClassVar[str] = NAME
    default_timeout: ClassVar[tuple[float, float]] = (180.0, 5.0)

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        for key in sorted(config):
            if key not in _KEYS:
                raise ConfigError(f"dns provider {NAME}: unknown setting {key!r}", key=f"{NAME}.{key}")
        kwargs: dict[str, Any] = {"region_name": str(config.get("region") or "us-east-1")}
        if not config.get("use_default_credentials"):
            for key in ("access_key_id", "secret_access_key"):
                if not _secret(config.get(key) or ""):
                    raise ConfigError(
                        f"dns provider {NAME}: missing {key} (or set use_default_credentials)",
                        key=f"{NAME}.{key}",
                    )
            kwargs["aws_access_key_id"] = _secret(config["access_key_id"])
            kwargs["aws_secret_access_key"] = _secret(config["secret_access_key"])
            if config.get("session_token"):
                kwargs["aws_session_token"] = _secret(config["session_token"])
        timeout = float(config.get("timeout") or 20.0)
        kwargs["config"] = botocore.config.Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"mode": "standard", "max_attempts": 1 + _int(config.get("max_retries"), 3)},
        )
        if config.get("endpoint_url"):
            kwargs["endpoint_url"] = str(config["endpoint_url"])
        self._client = boto3.session.Session().client("route53", **kwargs)
        self._zone_id = _zone_id(str(config["hosted_zone_id"])) if config.get("hosted_zone_id") else None
        self._ttl = int(config.get("ttl") or 60)
        insync = config.get("insync_timeout")
        self._insync_timeout = 60.0 if insync is None or insync == "" else float(insync)
        for key in ("secret_access_key", "session_token"):
            self.config.pop(key, None)

    def __repr__(self) -> str:
        return f"Route53Provider(hosted_zone_id={self._zone_id!r})"

    # -- interface ---------------------------------------------------------------------------

    def present(self, fqdn: str, value: str) -> Handle:
        name = _name(fqdn)
        zone_id = self._zone_id or self._find_zone(name)
        ttl, values = self._current(zone_id, name)
        change_id = None
        if value not in values:
            change_id = self._change(zone_id, "UPSERT", name, ttl or self._ttl, [*values, value])
            self._wait_insync(change_id)
        return {"provider": NAME, "hosted_zone_id": zone_id, "fqdn": name.rstrip("."), "change_id": change_id}

    def cleanup(self, fqdn: str, value: str, handle: Handle | None) -> None:
        name = _name(fqdn)
        zone_id = (handle or {}).get("hosted_zone_id") or self._zone_id or self._find_zone(name)
        for attempt in range(3):
            ttl, values = self._current(zone_id, name)
            if value not in values:
                return
            rest = [v for v in values if v != value]
            try:
                if rest:
                    self._change(zone_id, "UPSERT", name, ttl or self._ttl, rest)
                else:  # DELETE must name the exact current values; a concurrent change makes it fail
                    self._change(zone_id, "DELETE", name, ttl or self._ttl, values)
                return
            except ProviderError as exc:
                if exc.reason != f"{NAME}:invalid_change" or attempt == 2:
                    raise

    # -- internals ---------------------------------------------------------------------------

    def _current(self, zone_id: str, name: str) -> tuple[int | None, list[str]]:
        """(TTL, values) of the simple-routing TXT rrset at ``name``; (None, []) when there is none."""
        try:
            resp = self._client.list_resource_record_sets(
                HostedZoneId=zone_id, StartRecordName=name, StartRecordType="TXT", MaxItems="10"
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            _raise(exc, f"reading TXT {name}")
        for rrset in resp.get("ResourceRecordSets", []):
            if _name(rrset["Name"]) == name and rrset["Type"] == "TXT" and "SetIdentifier" not in rrset:
                values = [_decode_txt(r["Value"]) for r in rrset.get("ResourceRecords", [])]
                return int(rrset.get("TTL", self._ttl)), values
        return None, []

    def _change(self, zone_id: str, action: str, name: str, ttl: int, values: list[str]) -> str:
        batch = {
            "Comment": "certqueue dns-01",
            "Changes": [
                {
                    "Action": action,
                    "ResourceRecordSet": {
                        "Name": name,
                        "Type": "TXT",
                        "TTL": ttl,
                        "ResourceRecords": [{"Value": _encode_txt(v)} for v in values],
                    },
                }
            ],
        }
        try:
            resp = self._client.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch=batch)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            _raise(exc, f"{action} TXT {name}")
        return str(resp["ChangeInfo"]["Id"])

    def _wait_insync(self, change_id: str) -> None:
        deadline = time.monotonic() + self._insync_timeout
        while True:
            try:
                status = self._client.get_change(Id=change_id)["ChangeInfo"]["Status"]
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                _raise(exc, f"reading change {change_id}")
            if status == "INSYNC" or time.monotonic() + _INSYNC_POLL > deadline:
                return  # PENDING past the deadline is fine: the propagation check decides
            time.sleep(_INSYNC_POLL)

    def _find_zone(self, name: str) -> str:
        """The public hosted zone whose name is the longest suffix of ``name``."""
        best: tuple[int, str] | None = None
        try:
            for page in self._client.get_paginator("list_hosted_zones").paginate():
                for zone in page.get("HostedZones", []):
                    if zone.get("Config", {}).get("PrivateZone"):
                        continue
                    zname = _name(zone["Name"])
                    if (name == zname or name.endswith("." + zname)) and (
                        best is None or len(zname) > best[0]
                    ):
                        best = (len(zname), _zone_id(zone["Id"]))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            _raise(exc, "listing hosted zones")
        if best is None:
            raise ProviderError(
                NAME, f"no public hosted zone holds {name.rstrip('.')}", reason=f"{NAME}:zone_not_found"
            )
        return best[1]


def _name(fqdn: str) -> str:
    return fqdn.rstrip(".").lower() + "."


def _zone_id(raw: str) -> str:
    return raw.rsplit("/", 1)[-1]


def _raise(exc: Exception, doing: str) -> NoReturn:
    """Map a botocore error to a ProviderError with a stable reason."""
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        raise ProviderError(NAME, f"{doing}: no AWS credentials", reason=f"{NAME}:auth") from exc
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _AUTH_CODES or status in (401, 403):
            raise ProviderError(
                NAME, f"{doing}: credentials rejected ({code or status})", reason=f"{NAME}:auth"
            ) from exc
        if code in _THROTTLE_CODES or status == 429:
            raise ProviderError(
                NAME, f"{doing}: throttled ({code or status})", retryable=True, reason=f"{NAME}:rate_limited"
            ) from exc
        if status >= 500:
            raise ProviderError(
                NAME,
                f"{doing}: service unavailable ({code or status})",
                retryable=True,
                reason=f"{NAME}:unavailable",
            ) from exc
        if code in ("NoSuchHostedZone", "HostedZoneNotFound"):
            raise ProviderError(
                NAME, f"{doing}: hosted zone not found", reason=f"{NAME}:zone_not_found"
            ) from exc
        if code in ("InvalidChangeBatch", "InvalidInput"):
            raise ProviderError(
                NAME, f"{doing}: change rejected ({code})", reason=f"{NAME}:invalid_change"
            ) from exc
        raise ProviderError(
            NAME, f"{doing}: request failed ({code or status})", reason=f"{NAME}:error"
        ) from exc
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.ConnectionError,
    ):
        raise ProviderError(
            NAME,
            f"{doing}: cannot reach Route 53 ({type(exc).__name__})",
            retryable=True,
            reason=f"{NAME}:network",
        ) from exc
    raise ProviderError(
        NAME, f"{doing}: {type(exc).__name__}", retryable=True, reason=f"{NAME}:error"
    ) from exc
