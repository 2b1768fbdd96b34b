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
change only TXT records named ``_acme-challenge.*``). The zone is found by the core lookup
(``certqueue.dns.zones``) and matched by name to the account's public hosted zone; set
``hosted_zone_id`` to skip both. Every key has its place in ``SETTINGS`` (environment fallbacks:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_HOSTED_ZONE_ID``).

Settings::

    route53:
      access_key_id: AKIA...
      secret_access_key: "<secret>"   # SecretStr or str
      region: us-east-1
      hosted_zone_id: Z0123456789ABC   # optional; else the public hosted zone named as the zone
                                       # the core lookup finds (SOA walk)
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
from typing import Any, ClassVar, NoReturn

import boto3
import botocore.config
import botocore.exceptions

from certqueue import plugins
from certqueue.dns.base import DNSProvider, Handle
from certqueue.errors import ConfigError, ProviderError
from certqueue.plugins import Setting, secret_value

NAME = "route53"

_NUMBER = (int, float)
SETTINGS: plugins.Table = (
    Setting("access_key_id", (str,), "AWS access key id", secret=True, env=("AWS_ACCESS_KEY_ID",)),
    Setting(
        "secret_access_key", (str,), "AWS secret access key", secret=True, env=("AWS_SECRET_ACCESS_KEY",)
    ),
    Setting(
        "session_token",
        (str,),
        "AWS session token (temporary credentials)",
        secret=True,
        env=("AWS_SESSION_TOKEN",),
    ),
    Setting(
        "use_default_credentials",
        (bool,),
        "use boto3's own credential chain instead of a key",
        default=False,
    ),
    Setting("region", (str,), "AWS region of the API endpoint", default="us-east-1", env=("AWS_REGION",)),
    Setting(
        "hosted_zone_id",
        (str,),
        "skip the zone lookup: write into this hosted zone",
        env=("AWS_HOSTED_ZONE_ID",),
    ),
    Setting("endpoint_url", (str,), "API endpoint (moto in tests)"),
    Setting("timeout", _NUMBER, "seconds per HTTP request", default=20.0),
    Setting("max_retries", (int,), "botocore retries of throttling and 5xx", default=3),
    Setting("insync_timeout", _NUMBER, "seconds present waits for INSYNC (0: do not wait)", default=60.0),
)
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

    settings: ClassVar[plugins.Table] = SETTINGS

    def configure(self, s: dict[str, Any]) -> None:
        kwargs: dict[str, Any] = {"region_name": str(s["region"])}
        if not s["use_default_credentials"]:
            for key in ("access_key_id", "secret_access_key"):
                if not secret_value(s[key]):
                    raise ConfigError(
                        f"dns provider {NAME}: missing {key} (or set use_default_credentials)",
                        key=f"{NAME}.{key}",
                    )
            kwargs["aws_access_key_id"] = secret_value(s["access_key_id"])
            kwargs["aws_secret_access_key"] = secret_value(s["secret_access_key"])
            if s["session_token"]:
                kwargs["aws_session_token"] = secret_value(s["session_token"])
        timeout = float(s["timeout"])
        kwargs["config"] = botocore.config.Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"mode": "standard", "max_attempts": 1 + int(s["max_retries"])},
        )
        if s["endpoint_url"]:
            kwargs["endpoint_url"] = str(s["endpoint_url"])
        self._client = boto3.session.Session().client("route53", **kwargs)
        self._zone_id = _zone_id(str(s["hosted_zone_id"])) if s["hosted_zone_id"] else None
        self._insync_timeout = float(s["insync_timeout"])

    def __repr__(self) -> str:
        return f"Route53Provider(hosted_zone_id={self._zone_id!r})"

    # -- interface ---------------------------------------------------------------------------

    def present(self, fqdn: str, value: str) -> Handle:
        name = _name(fqdn)
        zone_id = self._zone_id or self._hosted_zone(name)
        ttl, values = self._current(zone_id, name)
        change_id = None
        if value not in values:
            change_id = self._change(zone_id, "UPSERT", name, ttl or self.ttl, [*values, value])
            self._wait_insync(change_id)
        return {"provider": NAME, "hosted_zone_id": zone_id, "fqdn": name.rstrip("."), "change_id": change_id}

    def cleanup(self, fqdn: str, value: str, handle: Handle | None) -> None:
        name = _name(fqdn)
        zone_id = (handle or {}).get("hosted_zone_id") or self._zone_id or self._hosted_zone(name)
        for attempt in range(3):
            ttl, values = self._current(zone_id, name)
            if value not in values:
                return
            rest = [v for v in values if v != value]
            try:
                if rest:
                    self._change(zone_id, "UPSERT", name, ttl or self.ttl, rest)
                else:  # DELETE must name the exact current values; a concurrent change makes it fail
                    self._change(zone_id, "DELETE", name, ttl or self.ttl, values)
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
                return int(rrset.get("TTL", self.ttl)), values
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

    def _hosted_zone(self, name: str) -> str:
        """The id of the account's public hosted zone for the zone the core lookup finds."""
        zone = _name(self.zone_of(name))
        try:
            for page in self._client.get_paginator("list_hosted_zones").paginate():
                for hz in page.get("HostedZones", []):
                    if _name(hz["Name"]) == zone and not hz.get("Config", {}).get("PrivateZone"):
                        return _zone_id(hz["Id"])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            _raise(exc, "listing hosted zones")
        raise ProviderError(
            NAME,
            f"no public hosted zone {zone.rstrip('.')} in this account (for {name.rstrip('.')})",
            reason=f"{NAME}:zone_not_found",
        )


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
