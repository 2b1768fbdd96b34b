"""A fake of the Cloudflare v4 API: zones lookup and DNS records, enough for DNS-01.

Point the official SDK at it with ``Cloudflare(api_token=..., base_url=fake.base_url)``. Responses
use Cloudflare's envelope (``success``, ``errors``, ``messages``, ``result``, ``result_info``).
Implemented: ``GET /zones?name=``, ``GET /zones/{id}``, ``GET|POST /zones/{id}/dns_records``
(filters ``name``, ``name.exact``, ``type``, ``content``, ``content.exact``; ``page``/``per_page``;
past the last page an empty list, as the SDK asks for one more page),
``DELETE /zones/{id}/dns_records/{rid}`` (404 code 81044 when gone), an identical record refused with
code 81058 as Cloudflare does, and the bearer token check (403, code 10000, on a wrong token).

State: ``zones`` (name -> id) and ``records`` (id -> record dict), both inspectable.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from tests.fakes import FakeServer, Request, Response

PREFIX = "/client/v4"


def _envelope(result: Any, *, result_info: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if result_info is not None:
        body["result_info"] = result_info
    return body


def _error(status: int, code: int, message: str) -> Response:
    return Response(
        status,
        {"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None},
    )


class FakeCloudflareAPI(FakeServer):
    def __init__(self, *, token: str = "cf-test-token", zones: tuple[str, ...] = ("example.test",)) -> None:
        super().__init__()
        self.token = token
        self.zones: dict[str, str] = {}
        self.records: dict[str, dict[str, Any]] = {}
        for z in zones:
            self.add_zone(z)

    @property
    def base_url(self) -> str:
        return self.url + PREFIX

    def add_zone(self, name: str) -> str:
        zid = secrets.token_hex(16)
        self.zones[name.lower()] = zid
        return zid

    def values(self, name: str) -> set[str]:
        """TXT contents at ``name`` (test helper)."""
        with self._lock:
            return {
                r["content"]
                for r in self.records.values()
                if r["name"] == name.lower() and r["type"] == "TXT"
            }

    def fault(self, status: int) -> Any:
        if status == 429:
            return {
                "success": False,
                "errors": [
                    {"code": 971, "message": "Please wait and consider throttling your request speed"}
                ],
                "messages": [],
                "result": None,
            }
        return {
            "success": False,
            "errors": [{"code": 10000 + status, "message": "injected failure"}],
            "messages": [],
            "result": None,
        }

    # -- routing -----------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        if req.headers.get("authorization") != f"Bearer {self.token}":
            return _error(403, 10000, "Authentication error")
        if not req.path.startswith(PREFIX):
            return _error(404, 7000, "No route for that URI")
        parts = [p for p in req.path[len(PREFIX) :].split("/") if p]
        if parts == ["zones"] and req.method == "GET":
            return self._list_zones(req)
        if len(parts) >= 2 and parts[0] == "zones":
            zone = self._zone_by_id(parts[1])
            if zone is None:
                return _error(
                    404, 7003, "Could not route to /zones/..., perhaps your object identifier is invalid?"
                )
            if len(parts) == 2 and req.method == "GET":
                return Response(200, _envelope(self._zone_obj(zone)))
            if parts[2:] == ["dns_records"] and req.method == "GET":
                return self._list_records(zone, req)
            if parts[2:] == ["dns_records"] and req.method == "POST":
                return self._create_record(zone, req)
            if len(parts) == 4 and parts[2] == "dns_records" and req.method == "DELETE":
                return self._delete_record(zone, parts[3])
            if len(parts) == 4 and parts[2] == "dns_records" and req.method == "GET":
                rec = self.records.get(parts[3])
                if rec is None or rec["zone_id"] != self.zones[zone]:
                    return _error(404, 81044, "Record does not exist.")
                return Response(200, _envelope(rec))
        return _error(404, 7000, "No route for that URI")

    def _zone_by_id(self, zid: str) -> str | None:
        return next((n for n, i in self.zones.items() if i == zid), None)

    def _zone_obj(self, name: str) -> dict[str, Any]:
        return {
            "id": self.zones[name],
            "name": name,
            "status": "active",
            "paused": False,
            "type": "full",
            "name_servers": ["ns1.fake.test", "ns2.fake.test"],
        }

    @staticmethod
    def _page(items: list[dict[str, Any]], req: Request) -> Response:
        page = max(1, int(float(req.query.get("page", "1"))))
        per_page = max(1, min(5000, int(float(req.query.get("per_page", "100")))))
        chunk = items[(page - 1) * per_page : page * per_page]
        info = {
            "page": page,
            "per_page": per_page,
            "count": len(chunk),
            "total_count": len(items),
            "total_pages": max(1, -(-len(items) // per_page)),
        }
        return Response(200, _envelope(chunk, result_info=info))

    def _list_zones(self, req: Request) -> Response:
        name = req.query.get("name")
        zones = [self._zone_obj(n) for n in sorted(self.zones) if name is None or n == name.lower()]
        return self._page(zones, req)

    def _list_records(self, zone: str, req: Request) -> Response:
        q = req.query
        name = (q.get("name.exact") or q.get("name") or "").lower() or None
        content = q.get("content.exact") or q.get("content")
        rtype = q.get("type")
        zid = self.zones[zone]
        found = [
            r
            for r in self.records.values()
            if r["zone_id"] == zid
            and (name is None or r["name"] == name)
            and (rtype is None or r["type"] == rtype)
            and (content is None or r["content"] == content)
        ]
        return self._page(sorted(found, key=lambda r: r["created_on"]), req)

    def _create_record(self, zone: str, req: Request) -> Response:
        body = req.json() or {}
        rtype, name, content = (
            body.get("type"),
            str(body.get("name", "")).rstrip(".").lower(),
            body.get("content"),
        )
        if not rtype or not name or content is None:
            return _error(400, 9000, "DNS name, type and content are required")
        if name != zone and not name.endswith("." + zone):
            return _error(400, 9005, "Content for record is invalid: name is outside the zone")
        for r in self.records.values():
            if r["zone_id"] == self.zones[zone] and (r["name"], r["type"], r["content"]) == (
                name,
                rtype,
                content,
            ):
                return _error(400, 81058, "An identical record already exists.")
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        rec = {
            "id": secrets.token_hex(16),
            "zone_id": self.zones[zone],
            "zone_name": zone,
            "name": name,
            "type": rtype,
            "content": content,
            "ttl": int(body.get("ttl") or 1),
            "proxied": False,
            "proxiable": False,
            "locked": False,
            "comment": body.get("comment"),
            "tags": [],
            "meta": {},
            "settings": {},
            "created_on": now,
            "modified_on": now,
        }
        self.records[rec["id"]] = rec
        return Response(200, _envelope(rec))

    def _delete_record(self, zone: str, rid: str) -> Response:
        rec = self.records.get(rid)
        if rec is None or rec["zone_id"] != self.zones[zone]:
            return _error(404, 81044, "Record does not exist.")
        del self.records[rid]
        return Response(200, _envelope({"id": rid}))
