"""The wire contract of the public tasks (``certqueue.issue``, ``.renew``, ``.revoke``, ``.propagate``,
``.status``): versioned JSON that carries ids and names of configured things, never URLs or
credentials.

The broker is a trust boundary (docs/security.md): whoever can publish a message must not be able
to point a worker at a server of their choosing (SSRF from inside the fleet, and the account's EAB
credentials sent along), nor hand it a secret. So a payload may name a certificate (its id), a CA
(a key of ``acme.authorities``, https only, from the settings files or the environment), a DNS
provider, regions, a key type; any string that looks like a URL, any field outside the task's
schema, and any string over ``MAX_STRING`` characters is refused with ``InvalidInput`` naming the
field, before anything is written.

``parse(task, payload)`` is what a public task calls first, on the worker; ``issue_payload`` is what
``certqueue.client`` builds (the same checks, on the sender's side, so a mistake fails there).
``parse`` turns a request's CA names into the directory URLs configured for them, which is the only
way a directory URL reaches ``CertificateRequest.build`` from the broker.

The contract other services read is docs/wire-contract.md, with a JSON Schema per task and version
shipped in the package (``certqueue/schemas/v<version>/<task>.json``, ``json_schema``); a test holds
those schemas to this module (fields, required fields, limits, the URL and CA-name rules).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib.resources import files
from typing import Any, Final

from certqueue import validation
from certqueue.errors import InvalidInput

PAYLOAD_VERSION: Final = 1
MAX_STRING: Final = 512
MAX_LIST: Final = 100

#: fields a public task's payload may carry (besides ``v``), and which of them are required
TASK_FIELDS: Final[dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    "certqueue.issue": (frozenset({"certificate_id", "request"}), frozenset()),
    "certqueue.renew": (frozenset({"certificate_id", "force", "reason"}), frozenset({"certificate_id"})),
    "certqueue.revoke": (frozenset({"certificate_id", "reason"}), frozenset({"certificate_id"})),
    "certqueue.propagate": (frozenset({"certificate_id", "regions", "force"}), frozenset({"certificate_id"})),
    "certqueue.status": (frozenset({"certificate_id"}), frozenset({"certificate_id"})),
}

#: what an issue request may carry: names and choices, never a URL or a secret
REQUEST_FIELDS: Final = frozenset(
    {
        "domains",
        "email",
        "key_type",
        "key_size",
        "challenge_type",
        "challenge_map",
        "dns_provider",
        "profile",
        "preferred_chain",
        "targets",
        "auto_renew",
        "reuse_key",
        "organization",
        "country",
        "state",
        "locality",
        "ca",
        "fallback_cas",
    }
)
#: fields a request must not carry over the broker, and what to do instead
REFUSED_REQUEST_FIELDS: Final = {
    "directory_url": "a CA is chosen by name: `ca` (a key of acme.authorities)",
    "fallback_directory_urls": "fallback CAs are chosen by name: `fallback_cas`",
}

_URL_LIKE = re.compile(r"://|^(?i:file|data|gopher|dict|ldap|ftp):")
_CA_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def _check_values(value: Any, field: str, depth: int = 0) -> None:
    """No URL, no overlong string, no deep or huge structure anywhere in a payload."""
    if depth > 4:
        raise InvalidInput("payload nested too deeply", field=field)
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise InvalidInput(f"longer than {MAX_STRING} characters", field=field)
        if _URL_LIKE.search(value):
            raise InvalidInput(
                "URLs are not accepted in task payloads (the broker carries ids and names of "
                "configured things only)",
                field=field,
            )
    elif isinstance(value, Mapping):
        if len(value) > MAX_LIST:
            raise InvalidInput(f"more than {MAX_LIST} entries", field=field)
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidInput("keys must be strings", field=field)
            _check_values(k, field, depth + 1)
            _check_values(v, f"{field}.{k}", depth + 1)
    elif isinstance(value, list | tuple):
        if len(value) > MAX_LIST:
            raise InvalidInput(f"more than {MAX_LIST} entries", field=field)
        for item in value:
            _check_values(item, field, depth + 1)
    elif value is not None and not isinstance(value, bool | int | float):
        raise InvalidInput(f"unsupported value of type {type(value).__name__}", field=field)


def check(task: str, payload: Any) -> dict[str, Any]:
    """The shape of ``payload`` for ``task`` (no settings needed: the sender runs this too)."""
    if task not in TASK_FIELDS:
        raise InvalidInput(f"{task!r} is not a public task", field="task")
    if not isinstance(payload, Mapping):
        raise InvalidInput("payload must be a JSON object", field="payload")
    version = payload.get("v")
    if type(version) is not int or version != PAYLOAD_VERSION:  # not True: Python's True == 1
        raise InvalidInput(
            f"unsupported payload version {payload.get('v')!r}; expected {PAYLOAD_VERSION}", field="v"
        )
    allowed, required = TASK_FIELDS[task]
    unknown = sorted(set(payload) - allowed - {"v"})
    if unknown:
        raise InvalidInput(f"unknown payload field(s): {', '.join(unknown)}", field=unknown[0])
    missing = sorted(required - set(payload))
    if missing:
        raise InvalidInput(f"missing payload field(s): {', '.join(missing)}", field=missing[0])
    if "certificate_id" in payload:
        validation.validate_certificate_id(payload["certificate_id"])
    if "force" in payload and not isinstance(payload["force"], bool):
        # "no" or 0 read as a truth value would force, or not, by accident
        raise InvalidInput("force is true or false", field="force")
    request = payload.get("request")
    if request is not None:
        if not isinstance(request, Mapping):
            raise InvalidInput("request must be a JSON object", field="request")
        for name, instead in REFUSED_REQUEST_FIELDS.items():
            if name in request:
                raise InvalidInput(f"{name} is not accepted from the broker; {instead}", field=name)
        unknown = sorted(set(request) - REQUEST_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown request field(s): {', '.join(unknown)}", field=unknown[0])
        fallbacks = request.get("fallback_cas") or []
        if not isinstance(fallbacks, list):
            raise InvalidInput("fallback_cas is a list of CA names", field="fallback_cas")
        names = [request["ca"]] if request.get("ca") is not None else []
        for ca in [*names, *fallbacks]:
            if not isinstance(ca, str) or not _CA_NAME.fullmatch(ca):
                raise InvalidInput("a CA is named by a key of acme.authorities", field="ca")
    for key, value in payload.items():
        _check_values(value, key)
    return dict(payload)


def parse(task: str, payload: Any, settings: Any = None) -> dict[str, Any]:
    """Worker side: ``check``, then a request's CA names resolved to their configured directory URLs
    (``directory_url``, ``fallback_directory_urls``: what ``CertificateRequest.build`` takes)."""
    out = check(task, payload)
    request = out.get("request")
    if request is None:
        return out
    from certqueue.config import get_settings

    settings = settings or get_settings()
    resolved = {k: v for k, v in request.items() if k not in ("ca", "fallback_cas")}
    named = {i.name for i in settings.issuers} | {"default"}
    if request.get("ca") in named and request["ca"] not in settings.acme.authorities:
        resolved["issuer"] = request["ca"]  # a named issuer: its own account, defaults, fallbacks
    elif request.get("ca") is not None:
        resolved["directory_url"] = ca_url(settings, request["ca"])
    if request.get("fallback_cas"):
        resolved["fallback_directory_urls"] = [ca_url(settings, n) for n in request["fallback_cas"]]
    out["request"] = resolved
    return out


def ca_url(settings: Any, name: str) -> str:
    authorities: dict[str, str] = {i.name: i.directory_url for i in settings.issuers}
    authorities.update(settings.acme.authorities)
    if name not in authorities:
        known = ", ".join(sorted(authorities)) or "none configured"
        raise InvalidInput(f"unknown CA {name!r} (acme.authorities: {known})", field="ca")
    return authorities[name]


def issue_payload(certificate_id: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """Client side: a checked ``certqueue.issue`` payload."""
    return check(
        "certqueue.issue", {"v": PAYLOAD_VERSION, "certificate_id": certificate_id, "request": dict(request)}
    )


def json_schema(task: str, version: int = PAYLOAD_VERSION) -> dict[str, Any]:
    """The published JSON Schema of ``task``'s payload at ``version`` (docs/wire-contract.md)."""
    if task not in TASK_FIELDS:
        raise InvalidInput(f"{task!r} is not a public task", field="task")
    resource = files("certqueue").joinpath("schemas", f"v{version}", f"{task}.json")
    if not resource.is_file():
        raise InvalidInput(f"no schema for {task} payload version {version}", field="v")
    schema: dict[str, Any] = json.loads(resource.read_text(encoding="utf-8"))
    return schema
