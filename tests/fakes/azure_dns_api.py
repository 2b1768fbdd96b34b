"""A fake of Azure DNS (ARM, api-version 2018-05-01) plus a fake Entra ID token endpoint, over HTTPS.

The SDK refuses bearer tokens over plain HTTP, so this fake serves TLS with a throwaway CA from
``devstack.tls.make_server_tls``; clients trust it with ``connection_verify=<ca.pem>``.

ARM calls implemented, under ``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network``:
``GET dnsZones`` (list by resource group), ``GET dnsZones/{zone}``, ``GET dnsZones/{zone}/TXT`` (list by
type), ``GET|PUT|DELETE dnsZones/{zone}/TXT/{relative}`` with etags (``If-Match`` -> 412 on a stale etag,
``If-None-Match: *`` -> 412 when the set exists). Any ``api-version`` is accepted. A wrong bearer token
gets 401 ``AuthenticationFailed``. Errors use ARM's ``{"error": {"code", "message"}}``.

Token endpoint, for azure-identity's ``ClientSecretCredential(authority=fake.url,
disable_instance_discovery=True, connection_verify=...)``: ``GET /{tenant}/v2.0/.well-known/
openid-configuration`` and ``POST /{tenant}/oauth2/v2.0/token`` (client_credentials; a wrong client id or
secret gets 401 ``invalid_client``, as Entra ID answers).

State: ``record_sets`` ((zone, relative) -> {"ttl", "values", "etag"}), inspectable.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from devstack.tls import make_server_tls
from tests.fakes import FakeServer, Request, Response

_ARM = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.Network/dnsZones(?:/(?P<zone>[^/]+)(?:/(?P<type>[^/]+)(?:/(?P<rel>[^/]+))?)?)?/?$",
    re.IGNORECASE,
)


def _arm_error(status: int, code: str, message: str) -> Response:
    return Response(status, {"error": {"code": code, "message": message}})


class FakeAzureDNSAPI(FakeServer):
    def __init__(
        self,
        tls_dir: Path,
        *,
        subscription_id: str = "00000000-0000-0000-0000-000000000001",
        resource_group: str = "dns-rg",
        zones: tuple[str, ...] = ("example.test",),
        tenant_id: str = "tenant-test",
        client_id: str = "client-test",
        client_secret: str = "azure-test-secret",
    ) -> None:
        self.tls = make_server_tls(tls_dir, label="certqueue azure fake")
        super().__init__(tls_cert=self.tls.cert, tls_key=self.tls.key)
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.zones = {z.lower() for z in zones}
        self.tenant_id, self.client_id, self.client_secret = tenant_id, client_id, client_secret
        self.access_token = "azure-access-" + secrets.token_hex(8)
        self.record_sets: dict[tuple[str, str], dict[str, Any]] = {}
        self.tokens_issued = 0
        self._race: tuple[str, str, str] | None = None

    @property
    def ca_cert(self) -> str:
        return str(self.tls.ca_cert)

    def values(self, zone: str, relative: str) -> set[str]:
        with self._lock:
            rs = self.record_sets.get((zone.lower(), relative.lower()))
            return set(rs["values"]) if rs else set()

    def race_next_write(self, zone: str, relative: str, value: str) -> None:
        """Just before the next PUT or DELETE, another writer adds ``value`` at (zone, relative): the
        record set's etag changes, as when two workers present values at one name at once."""
        with self._lock:
            self._race = (zone.lower(), relative.lower(), value)

    def _apply_race(self) -> None:
        if self._race is None:
            return
        zone, rel, value = self._race
        self._race = None
        rs = self.record_sets.setdefault((zone, rel), {"ttl": 60, "values": [], "etag": ""})
        rs["values"] = [*rs["values"], value]
        rs["etag"] = secrets.token_hex(8)

    def faultable(self, req: Request) -> bool:
        return req.path.startswith("/subscriptions/")  # faults hit ARM, not the token endpoint

    def fault(self, status: int) -> Any:
        code = "TooManyRequests" if status == 429 else "InternalServerError"
        return {"error": {"code": code, "message": f"injected {status}"}}

    # -- routing -----------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        parts = [p for p in req.path.split("/") if p]
        if len(parts) >= 2 and parts[1] in ("v2.0", "oauth2"):
            return self._identity(req, parts)
        if req.headers.get("authorization") != f"Bearer {self.access_token}":
            return _arm_error(401, "AuthenticationFailed", "Authentication failed.")
        m = _ARM.match(req.path)
        if m is None:
            return _arm_error(404, "NotFound", "no such route")
        if m["sub"] != self.subscription_id or m["rg"].lower() != self.resource_group.lower():
            return _arm_error(404, "ResourceGroupNotFound", f"Resource group '{m['rg']}' could not be found.")
        zone = (m["zone"] or "").lower()
        if not zone:
            if req.method != "GET":
                return _arm_error(405, "MethodNotAllowed", "")
            return Response(200, {"value": [self._zone_obj(z) for z in sorted(self.zones)]})
        if zone not in self.zones:
            return _arm_error(
                404,
                "ParentResourceNotFound",
                f"Can not perform requested operation on nested "
                f"resource. Parent resource '{zone}' not found.",
            )
        if m["type"] is None:
            return Response(200, self._zone_obj(zone)) if req.method == "GET" else _arm_error(405, "", "")
        if m["type"].upper() != "TXT":
            return _arm_error(400, "BadRequest", "only TXT in this fake")
        if m["rel"] is None:
            items = [self._rs_obj(z, r) for (z, r) in sorted(self.record_sets) if z == zone]
            return Response(200, {"value": items})
        rel = m["rel"].lower()
        key = (zone, rel)
        if req.method in ("PUT", "DELETE"):
            self._apply_race()
        current = self.record_sets.get(key)
        if_match = req.headers.get("if-match")
        if_none_match = req.headers.get("if-none-match")
        if if_match is not None and (current is None or (if_match != "*" and if_match != current["etag"])):
            return _arm_error(
                412,
                "PreconditionFailed",
                "The condition specified using HTTP conditional header(s) is not met.",
            )
        if req.method == "GET":
            if current is None:
                return _arm_error(
                    404,
                    "NotFound",
                    f"The resource record '{rel}' does not exist in resource "
                    f"group '{self.resource_group}' of subscription '{self.subscription_id}'.",
                )
            return Response(200, self._rs_obj(zone, rel))
        if req.method == "PUT":
            if if_none_match == "*" and current is not None:
                return _arm_error(412, "PreconditionFailed", "The record set already exists.")
            props = (req.json() or {}).get("properties") or {}
            values = ["".join(r.get("value") or []) for r in props.get("TXTRecords") or []]
            created = current is None
            self.record_sets[key] = {
                "ttl": int(props.get("TTL") or 3600),
                "values": values,
                "etag": secrets.token_hex(8),
            }
            return Response(201 if created else 200, self._rs_obj(zone, rel))
        if req.method == "DELETE":
            if current is None:
                return Response(204)
            del self.record_sets[key]
            return Response(200)
        return _arm_error(405, "MethodNotAllowed", "")

    def _zone_obj(self, zone: str) -> dict[str, Any]:
        return {
            "id": f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/"
            f"Microsoft.Network/dnszones/{zone}",
            "name": zone,
            "type": "Microsoft.Network/dnszones",
            "location": "global",
            "etag": "zone-etag",
            "properties": {
                "maxNumberOfRecordSets": 10000,
                "numberOfRecordSets": 2,
                "nameServers": ["ns1-01.azure-dns.com."],
                "zoneType": "Public",
            },
        }

    def _rs_obj(self, zone: str, rel: str) -> dict[str, Any]:
        rs = self.record_sets[(zone, rel)]
        fqdn = f"{zone}." if rel == "@" else f"{rel}.{zone}."
        return {
            "id": f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/"
            f"Microsoft.Network/dnszones/{zone}/TXT/{rel}",
            "name": rel,
            "type": "Microsoft.Network/dnszones/TXT",
            "etag": rs["etag"],
            "properties": {
                "TTL": rs["ttl"],
                "fqdn": fqdn,
                "provisioningState": "Succeeded",
                "TXTRecords": [{"value": [v]} for v in rs["values"]],
            },
        }

    def _identity(self, req: Request, parts: list[str]) -> Response:
        tenant = parts[0]
        base = f"{self.url}/{tenant}"
        if req.method == "GET" and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return Response(
                200,
                {
                    "token_endpoint": f"{base}/oauth2/v2.0/token",
                    "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                    "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                    "issuer": f"{base}/v2.0",
                    "tenant_region_scope": None,
                },
            )
        if req.method == "POST" and parts[1:] == ["oauth2", "v2.0", "token"]:
            form = dict(parse_qsl(req.body.decode()))
            if (
                tenant != self.tenant_id
                or form.get("client_id") != self.client_id
                or form.get("client_secret") != self.client_secret
            ):
                return Response(
                    401,
                    {
                        "error": "invalid_client",
                        "error_description": "AADSTS7000215: Invalid client secret provided.",
                        "error_codes": [7000215],
                    },
                )
            self.tokens_issued += 1
            return Response(
                200,
                {
                    "token_type": "Bearer",
                    "expires_in": 3600,
                    "ext_expires_in": 3600,
                    "access_token": self.access_token,
                },
            )
        return Response(404, {"error": "not_found"})
