"""The published payload schemas (certqueue/schemas/v1/*.json, docs/wire-contract.md) held to what
the workers accept (certqueue.payloads), so the two cannot drift (issue 16, item 5).

* every public task (a registered task named ``certqueue.<word>``) has a schema, and every schema is
  a public task of ``payloads.TASK_FIELDS``;
* each schema's fields, required fields, version, limits, enums, the certificate-id and CA-name
  patterns and the URL rule are those of ``payloads`` and ``validation``;
* each schema's examples validate and pass ``payloads.parse`` (and a new certificate's request
  passes ``CertificateRequest.build``); every payload of ``INVALID`` fails both;
* what only the schema refuses (``SCHEMA_ONLY``) is pinned too: parse accepts it, and the worker
  refuses it later or reads it loosely, as docs/wire-contract.md says.

The schemas are checked by a small validator of the JSON Schema keywords they use (written here:
jsonschema is not a declared dependency of certqueue or of its tests, only a transitive one of the
dev lock); a keyword it does not know fails the test rather than being ignored.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import certqueue.tasks
from certqueue import payloads, validation
from certqueue.certificates import CHALLENGE_TYPES, CertificateRequest
from certqueue.config import Settings
from certqueue.errors import InvalidInput

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "certqueue" / "schemas" / f"v{payloads.PAYLOAD_VERSION}"
CID = "cert_7tze2b7klgfscybqehwv"

# --- a validator of the keywords the schemas use (Draft 2020-12 semantics) --------------------------

ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "examples"}
ASSERTIONS = {
    "$ref",
    "type",
    "const",
    "enum",
    "pattern",
    "maxLength",
    "minItems",
    "maxItems",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "maxProperties",
    "propertyNames",
    "anyOf",
    "not",
}


def _is(value: Any, type_name: str) -> bool:
    if type_name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    python = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    return isinstance(value, python[type_name])


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, [1] is [1.0]."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def errors(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$") -> list[str]:
    """Why ``value`` does not validate against ``schema`` (empty: it does)."""
    unknown = set(schema) - ANNOTATIONS - ASSERTIONS
    assert not unknown, f"the test's validator does not know {sorted(unknown)}"
    out: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        out += errors(value, root["$defs"][ref.removeprefix("#/$defs/")], root, at)
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is(value, n) for n in names):
            return [*out, f"{at}: not {' or '.join(names)}"]
    if "const" in schema and not _same(value, schema["const"]):
        out.append(f"{at}: not {schema['const']!r}")
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        out.append(f"{at}: not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{at}: does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)):
            out.append(f"{at}: longer than {schema['maxLength']}")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            out.append(f"{at}: {len(value)} items")
        for i, item in enumerate(value):
            out += errors(item, schema.get("items", {}), root, f"{at}[{i}]")
    if isinstance(value, dict):
        if len(value) > schema.get("maxProperties", len(value)):
            out.append(f"{at}: more than {schema['maxProperties']} members")
        out += [f"{at}: {name} is missing" for name in schema.get("required", []) if name not in value]
        props = schema.get("properties", {})
        for name, item in value.items():
            if "propertyNames" in schema:
                out += errors(name, schema["propertyNames"], root, f"{at}.{name}(name)")
            if name in props:
                out += errors(item, props[name], root, f"{at}.{name}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{at}: {name} is not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += errors(item, schema["additionalProperties"], root, f"{at}.{name}")
    if "anyOf" in schema and all(errors(value, s, root, at) for s in schema["anyOf"]):
        out.append(f"{at}: matches none of anyOf")
    if "not" in schema and not errors(value, schema["not"], root, at):
        out.append(f"{at}: matches what is refused")
    return out


def subschemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``schema`` and every schema inside it."""
    yield schema
    for key in ("properties", "$defs"):
        for sub in schema.get(key, {}).values():
            yield from subschemas(sub)
    for key in ("items", "additionalProperties", "propertyNames", "not"):
        if isinstance(schema.get(key), dict):
            yield from subschemas(schema[key])
    for sub in schema.get("anyOf", []):
        yield from subschemas(sub)


def load(task: str) -> dict[str, Any]:
    return dict(json.loads((SCHEMAS / f"{task}.json").read_text()))


def valid(task: str, payload: Any) -> list[str]:
    schema = load(task)
    return errors(payload, schema, schema)


# --- every public task, and nothing else, has a schema ------------------------------------------------


def registered_public_tasks() -> set[str]:
    """Tasks other services may send: registered under ``certqueue.<word>`` (the pipeline's own
    steps are ``certqueue.<pool>.<step>``)."""
    for module in pkgutil.iter_modules(certqueue.tasks.__path__):
        importlib.import_module(f"certqueue.tasks.{module.name}")
    app = Celery("wire-contract-probe", set_as_current=False)
    return {name for name in app.tasks if re.fullmatch(r"certqueue\.[a-z_]+", name)}


def test_every_public_task_has_a_schema() -> None:
    public = registered_public_tasks()
    assert public == set(payloads.TASK_FIELDS)
    assert {p.stem for p in SCHEMAS.glob("*.json")} == public
    for task in public:
        assert payloads.json_schema(task) == load(task)  # what the package ships is these files
    with pytest.raises(InvalidInput, match="not a public task"):
        payloads.json_schema("certqueue.acme.start")
    with pytest.raises(InvalidInput, match="no schema"):
        payloads.json_schema("certqueue.renew", version=payloads.PAYLOAD_VERSION + 1)


def test_the_schemas_use_only_keywords_the_check_knows() -> None:
    for task in payloads.TASK_FIELDS:
        schema = load(task)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        for sub in subschemas(schema):
            assert set(sub) <= ANNOTATIONS | ASSERTIONS, (task, sorted(set(sub) - ANNOTATIONS - ASSERTIONS))


# --- the schemas say what payloads.py checks --------------------------------------------------------


@pytest.mark.parametrize("task", sorted(payloads.TASK_FIELDS))
def test_fields_required_fields_and_version(task: str) -> None:
    schema = load(task)
    allowed, required = payloads.TASK_FIELDS[task]
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["properties"]) == allowed | {"v"}
    assert set(schema["required"]) == required | {"v"}
    assert schema["properties"]["v"] == {"description": "The payload version: 1.", "const": 1}
    assert payloads.PAYLOAD_VERSION == 1  # a new version is a new folder of schemas (v2/)
    assert schema["$id"] == f"urn:certqueue:payload:{task}:v{payloads.PAYLOAD_VERSION}"
    assert schema["$defs"] == load("certqueue.status")["$defs"]  # one set of definitions, in each file


def test_the_request_of_a_new_certificate() -> None:
    request = load("certqueue.issue")["properties"]["request"]
    assert set(request["properties"]) == payloads.REQUEST_FIELDS
    assert request["additionalProperties"] is False
    assert not set(request["properties"]) & set(payloads.REFUSED_REQUEST_FIELDS)
    props = request["properties"]
    assert props["key_type"]["enum"] == [*validation.KEY_TYPES, None]
    assert props["key_size"]["enum"] == [*validation.KEY_SIZES, None]
    assert props["challenge_type"]["enum"] == [*CHALLENGE_TYPES, None]
    assert props["challenge_map"]["additionalProperties"]["enum"] == list(CHALLENGE_TYPES)


def test_revocation_reasons() -> None:
    reason = load("certqueue.revoke")["properties"]["reason"]
    assert reason["enum"] == [*validation.REVOCATION_REASONS, None]


def test_patterns_and_limits() -> None:
    defs = load("certqueue.status")["$defs"]
    assert defs["certificate_id"]["pattern"] == f"^{validation._CERT_ID.pattern}$"
    assert defs["ca_name"]["pattern"] == f"^{payloads._CA_NAME.pattern}$"
    assert defs["text"]["maxLength"] == defs["optional_text"]["maxLength"] == payloads.MAX_STRING
    for task in payloads.TASK_FIELDS:
        for sub in subschemas(load(task)):
            if "maxItems" in sub:
                assert sub["maxItems"] == payloads.MAX_LIST, task
            if "maxProperties" in sub:
                assert sub["maxProperties"] == payloads.MAX_LIST, task
            kinds = sub.get("type", [])
            if "array" in kinds:
                assert "maxItems" in sub, (task, sub)
            if "object" in kinds:
                assert "maxProperties" in sub or sub.get("additionalProperties") is False, (task, sub)


def url_like_corpus() -> list[str]:
    """Strings on both sides of payloads' URL rule, made from the rule itself: every scheme it
    names, in three cases, at the start and inside; '://' anywhere."""
    schemes = re.search(r"\(\?i:([a-z|]+)\)", payloads._URL_LIKE.pattern)
    assert schemes is not None, payloads._URL_LIKE.pattern
    corpus = ["https://ca.example/dir", "x://y", "a name", "example.com", "mailto:ops", "http:x", ""]
    for scheme in schemes.group(1).split("|"):
        for s in (scheme, scheme.upper(), scheme.capitalize()):
            corpus += [f"{s}:x", f"x{s}:", f" {s}:", f"{s}s:"]
    return corpus


def test_the_url_rule_is_the_workers() -> None:
    text = load("certqueue.status")["$defs"]["text"]
    root = {"$defs": {}}
    for s in url_like_corpus():
        refused = bool(payloads._URL_LIKE.search(s))
        assert bool(errors(s, text, root)) == refused, s


# --- examples pass both; invalid payloads fail both ----------------------------------------------------


@pytest.fixture
def settings(settings_factory: Callable[..., Settings], tmp_path: Path) -> Settings:
    """Workers that know the examples' CAs and region."""
    return settings_factory(
        **{
            "acme.authorities": {
                "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
                "zerossl": "https://acme.zerossl.com/v2/DV90",
            },
            "multi_region.regions": [
                {"name": "us-east-1", "provider": "local", "path": str(tmp_path / "out")}
            ],
        }
    )


def examples() -> list[tuple[str, Any]]:
    return [(task, ex) for task in sorted(payloads.TASK_FIELDS) for ex in load(task)["examples"]]


@pytest.mark.parametrize(("task", "payload"), examples())
def test_each_example_validates_and_parses(task: str, payload: Any, settings: Settings) -> None:
    assert valid(task, payload) == []
    parsed = payloads.parse(task, payload, settings)
    if "request" in parsed:
        req = CertificateRequest.build(settings=settings, **parsed["request"])
        assert req.domains  # built: every name valid, the CA, region and provider known


def test_every_task_has_examples() -> None:
    assert {task for task, _ in examples()} == set(payloads.TASK_FIELDS)


LONG = "x" * (payloads.MAX_STRING + 1)
INVALID: list[tuple[str, Any]] = [
    ("certqueue.status", ["cert_7tze2b7klgfscybqehwv"]),  # not an object
    ("certqueue.renew", {"certificate_id": CID}),  # no version
    ("certqueue.renew", {"v": 2, "certificate_id": CID}),  # a version the workers do not know
    ("certqueue.renew", {"v": "1", "certificate_id": CID}),
    ("certqueue.renew", {"v": True, "certificate_id": CID}),  # Python's True == 1: not a version
    ("certqueue.renew", {"v": 1, "certificate_id": CID, "force": "yes"}),  # not a truth value
    ("certqueue.propagate", {"v": 1, "certificate_id": CID, "force": 0}),
    ("certqueue.renew", {"v": 1}),  # no certificate_id
    ("certqueue.renew", {"v": 1, "certificate_id": "cert_NOT-AN-ID"}),
    ("certqueue.renew", {"v": 1, "certificate_id": 42}),
    ("certqueue.renew", {"v": 1, "certificate_id": CID, "reason": "see https://evil.example"}),
    ("certqueue.renew", {"v": 1, "certificate_id": CID, "reason": LONG}),
    ("certqueue.revoke", {"v": 1, "certificate_id": CID, "when": "now"}),  # an unknown field
    ("certqueue.propagate", {"v": 1, "certificate_id": CID, "regions": ["FTP:region"]}),
    ("certqueue.propagate", {"v": 1, "certificate_id": CID, "regions": ["r"] * (payloads.MAX_LIST + 1)}),
    ("certqueue.status", {"v": 1, "certificate_id": CID, "force": True}),
    ("certqueue.issue", {"v": 1, "request": "example.com"}),  # request not an object
    ("certqueue.issue", {"v": 1, "request": {"domains": ["a.example"], "directory_url": "https://x/d"}}),
    ("certqueue.issue", {"v": 1, "request": {"domains": ["a.example"], "fallback_directory_urls": []}}),
    ("certqueue.issue", {"v": 1, "request": {"domains": ["a.example"], "ca": "https://evil.example/dir"}}),
    ("certqueue.issue", {"v": 1, "request": {"domains": ["a.example"], "ca": "Upper"}}),
    ("certqueue.issue", {"v": 1, "request": {"domains": ["a.example"], "fallback_cas": "zerossl"}}),
    ("certqueue.issue", {"v": 1, "request": {"domains": ["a.example"], "colour": "red"}}),
    ("certqueue.issue", {"v": 1, "request": {"domains": [LONG]}}),
    ("certqueue.issue", {"v": 1, "request": {"domains": [f"n{i}.example" for i in range(101)]}}),
    ("certqueue.issue", {"v": 1, "request": {"domains": ["a.example"], "email": "file:/etc/passwd"}}),
    ("certqueue.issue", {"v": 1, "certificate_id": "cert_x", "request": {"domains": ["a.example"]}}),
]


@pytest.mark.parametrize(("task", "payload"), INVALID, ids=[f"{i}-{t}" for i, (t, _) in enumerate(INVALID)])
def test_an_invalid_payload_fails_both(task: str, payload: Any, settings: Settings) -> None:
    assert valid(task, payload) != []
    with pytest.raises(InvalidInput):
        payloads.parse(task, payload, settings)


#: refused by the schema but not by ``payloads.parse``: the worker refuses these later (the job
#: fails, nothing is written) or reads them loosely; docs/wire-contract.md lists them
SCHEMA_ONLY: list[tuple[str, Any]] = [
    ("certqueue.issue", {"v": 1}),  # the task: "payload needs certificate_id or request"
    ("certqueue.issue", {"v": 1, "request": {"email": "ops@example.com"}}),  # build: no domains
    ("certqueue.issue", {"v": 1, "request": {"domains": []}}),  # build: no domains
    ("certqueue.issue", {"v": 1, "request": {"domains": ["a.example"], "key_type": "ec999"}}),  # build
    ("certqueue.revoke", {"v": 1, "certificate_id": CID, "reason": "bored"}),  # the task: unknown reason
]


@pytest.mark.parametrize(
    ("task", "payload"), SCHEMA_ONLY, ids=[f"{i}-{t}" for i, (t, _) in enumerate(SCHEMA_ONLY)]
)
def test_what_only_the_schema_refuses(task: str, payload: Any, settings: Settings) -> None:
    assert valid(task, payload) != []
    payloads.parse(task, payload, settings)  # when this starts to refuse it, move it to INVALID


# --- answers: the keys docs/wire-contract.md lists are the ones the tasks return -----------------------

#: per public task, the keys of each answer it gives (docs/wire-contract.md, "Results")
RESULT_KEYS: dict[str, list[set[str]]] = {
    "certqueue.issue": [{"certificate_id", "created", "intent", "status", "state"}],
    "certqueue.renew": [{"certificate_id", "intent", "status"}, {"certificate_id", "status", "renew_at"}],
    "certqueue.revoke": [{"certificate_id", "intent", "status"}, {"certificate_id", "status"}],
    "certqueue.propagate": [{"certificate_id", "intent", "regions", "status"}],
    "certqueue.status": [{"certificate_id", "state", "domains", "last_error", "serial", "not_after"}],
}


def documented_answers() -> dict[str, list[set[str]]]:
    """The keys of each answer in the doc's Results table (`{"key", "key": ..., ...}`)."""
    text = (REPO / "docs" / "wire-contract.md").read_text()
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    out: dict[str, list[set[str]]] = {}
    for row in re.findall(r"^\| `(certqueue\.\w+)` \| (.*) \|$", section, re.M):
        answers = re.findall(r"`(\{[^`]*\})`", row[1])
        # a key is a quoted name at the start of an answer or after ", ", never a value after ": "
        out[row[0]] = [set(re.findall(r'(?:\{|, )"(\w+)"', a)) for a in answers]
    return out


def test_the_documented_answers_are_the_tasks() -> None:
    assert documented_answers() == RESULT_KEYS


@pytest.fixture
def worker(
    sqlite_url: str, settings_factory: Callable[..., Settings], tmp_path: Path
) -> Iterator[Callable[[str, dict[str, Any]], Any]]:
    """A public task's first step run as a worker runs it (a pushed request, run_step), on SQLite."""
    from certqueue.tasks import acme, propagate

    settings_factory(
        database_url=sqlite_url,
        **{
            "broker.filesystem_path": str(tmp_path / "broker"),
            "acme.directory_url": "https://ca.example/dir",
            "multi_region.enabled": True,
            "multi_region.regions": [{"name": "eu", "provider": "local", "path": str(tmp_path / "eu")}],
        },
    )
    steps = {
        "certqueue.issue": (acme.issue, acme._issue_step),
        "certqueue.renew": (acme.renew, acme._renew_step),
        "certqueue.revoke": (acme.revoke, acme._request_revoke_step),
        "certqueue.propagate": (propagate.propagate, propagate._request_step),
        "certqueue.status": (acme.status, acme._status_step),
    }

    def run(task: str, payload: dict[str, Any]) -> Any:
        celery_task, step = steps[task]
        celery_task.push_request(id="wire-1", args=[payload], kwargs={}, called_directly=False)
        try:
            return celery_task.run_step(step, payload)
        finally:
            celery_task.pop_request()

    yield run


def _active(name: str) -> str:
    from certqueue import certificates, events
    from certqueue.db import session_scope
    from certqueue.models import State
    from tests.conftest_db import make_cert_pem

    leaf, key = make_cert_pem((name,), days=90)
    with session_scope() as s:
        cert, _ = certificates.create_certificate(s, CertificateRequest.build(domains=[name]), actor="test")
        events.transition(s, cert, State.ISSUING)
        iss = certificates.store_issuance(s, cert, leaf, key)
        events.transition(s, cert, State.ISSUED)
        certificates.activate(s, cert, iss, reason="test")
        return cert.id


def test_each_answer_has_the_documented_keys(worker: Callable[[str, dict[str, Any]], Any]) -> None:
    answers: dict[str, list[Any]] = {task: [] for task in RESULT_KEYS}

    def ask(task: str, **fields: Any) -> Any:
        payload = payloads.parse(task, {"v": 1, **fields})
        answers[task].append(worker(task, payload))
        return answers[task][-1]

    new = ask("certqueue.issue", request={"domains": ["wire.example.com"]})
    assert new["status"] == "accepted"
    cid = _active("served.example.com")
    assert ask("certqueue.issue", certificate_id=cid)["status"] == "noop"  # ACTIVE: nothing to issue
    assert ask("certqueue.renew", certificate_id=cid)["status"] == "not_due"
    assert ask("certqueue.renew", certificate_id=cid, force=True)["status"] == "accepted"
    assert ask("certqueue.propagate", certificate_id=cid, regions=["eu"])["regions"] == ["eu"]
    assert ask("certqueue.status", certificate_id=cid)["state"] == "ACTIVE"
    assert ask("certqueue.revoke", certificate_id=cid, reason="keyCompromise")["status"] == "accepted"
    revoked = _active("gone.example.com")
    from certqueue.db import session_scope
    from certqueue.models import Certificate, State

    with session_scope() as s:
        row = s.get(Certificate, revoked)
        assert row is not None
        row.state = State.REVOKED
    assert ask("certqueue.revoke", certificate_id=revoked)["status"] == "revoked"
    for task, given in answers.items():
        assert given, task
        for answer in given:
            assert set(answer) in RESULT_KEYS[task], (task, answer)
        assert [k for k in RESULT_KEYS[task] if k not in [set(a) for a in given]] == [], task
        json.dumps(given)  # JSON, as the result backend stores it
