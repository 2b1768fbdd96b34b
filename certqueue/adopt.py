"""Bringing existing certificates under management (``certqueue adopt``): certbot lineages and
cert-manager TLS Secrets become ordinary managed certificates, served as they are now (their current
certificate and key are stored as the current issuance) and renewed through ACME from then on.

Two halves. Reading (no database): :func:`read_certbot` and :func:`read_kubectl_json` turn a
certbot directory or kubectl's JSON into :class:`Candidate` values, one per lineage or Secret, and
:func:`plan` checks one against the settings (the certificate and key, and the request the renewals
will make). Writing: :func:`adopt` stores one plan in the caller's transaction, through the same
operations as the pipeline (``create_certificate``, ``store_issuance``, ``activate``). Owns no state
of its own; the rows it writes are owned by ``certqueue.certificates``.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from certqueue import certificates, events, issuers, validation
from certqueue.config import Settings
from certqueue.errors import InvalidInput, InvalidTransition
from certqueue.inventory import list_certificates
from certqueue.models import LIVE_STATES, Certificate, State

DEFAULT_CERTBOT_DIR = Path("/etc/letsencrypt")

#: certbot authenticators answered over HTTP; certqueue answers with its own responder
HTTP_AUTHENTICATORS = ("webroot", "standalone", "nginx", "apache")
#: certbot's DNS plugins (``dns-<name>``) that have a certqueue provider of another name
DNS_PLUGIN_PROVIDERS: Mapping[str, str] = {
    "dns-cloudflare": "cloudflare",
    "dns-route53": "route53",
    "dns-rfc2136": "rfc2136",
    "dns-azure": "azure",
}
#: certbot's ``elliptic_curve`` values
CURVES: Mapping[str, str] = {"secp256r1": "ec256", "prime256v1": "ec256", "secp384r1": "ec384"}

#: annotations read on a Secret: certqueue's own (set them before adopting), then cert-manager's
CHALLENGE_ANNOTATION = "certqueue.io/challenge"
DNS_PROVIDER_ANNOTATION = "certqueue.io/dns-provider"
CM_ISSUER_ANNOTATION = "cert-manager.io/issuer-name"
CM_HTTP01_PREFIX = "acme.cert-manager.io/http01-"
TLS_SECRET_TYPE = "kubernetes.io/tls"  # noqa: S105  (a Secret type, not a password)


@dataclass(frozen=True)
class Candidate:
    """One lineage or Secret as read: what it holds and how its renewals should be requested."""

    source: str  # "certbot" or "cert-manager"
    name: str  # the lineage ("example.com") or the Secret ("namespace/name")
    fullchain_pem: str | None = None
    key_pem: str | None = None
    challenge_type: str | None = None
    dns_provider: str | None = None
    #: the ACME directory it was issued from (certbot's ``server``), when known
    directory_url: str | None = None
    #: the issuer the source names (cert-manager's issuer-name), when any
    issuer_name: str | None = None
    key_type: str | None = None
    reuse_key: bool = False
    notes: tuple[str, ...] = ()
    #: why it cannot be adopted, found while reading (an unreadable file, an unknown plugin)
    error: str | None = None


@dataclass
class Plan:
    """A candidate checked: the certificate it serves and the request its renewals make."""

    candidate: Candidate
    external: certificates.ExternalCertificate
    request: certificates.CertificateRequest
    ca: str  # the issuer's name (``default`` when none is named)
    notes: list[str] = field(default_factory=list)


# --- certbot --------------------------------------------------------------------------------------


def parse_renewal_conf(text: str) -> dict[str, dict[str, str]]:
    """certbot's renewal conf (ConfigObj): the top-level keys under ``""``, then each section
    (``renewalparams``; the ``[[webroot_map]]`` subsection as ``[webroot_map]``)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False, default_section="\0none")
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string("[\0top]\n" + text)
    out = {("" if s == "\0top" else s.strip("[]")): dict(parser.items(s)) for s in parser.sections()}
    return out


def _as_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def challenge_for_authenticator(
    authenticator: str, params: Mapping[str, str]
) -> tuple[str, str | None, list[str]]:
    """(challenge type, certqueue DNS provider or None, notes) for a certbot authenticator.

    Raises InvalidInput for an authenticator certqueue cannot stand in for."""
    auth = authenticator.split(":")[-1].strip()  # "certbot-dns-cloudflare:dns-cloudflare" (old form)
    if not auth:
        raise InvalidInput("the renewal conf names no authenticator", field="authenticator")
    if auth in HTTP_AUTHENTICATORS:
        return (
            "http-01",
            None,
            [
                f"certbot's {auth} authenticator -> http-01, answered by certqueue's responder"
                " (`certqueue http01`): route /.well-known/acme-challenge/ to it"
            ],
        )
    if auth.startswith("dns-"):
        provider = DNS_PLUGIN_PROVIDERS.get(auth)
        if provider is not None:
            return "dns-01", provider, [f"certbot plugin {auth} -> dns-01 with DNS provider {provider}"]
        return (
            "dns-01",
            None,
            [
                f"certbot plugin {auth} has no certqueue DNS provider: dns-01 through"
                " challenges.dns_provider or the named solvers (docs/solvers.md)"
            ],
        )
    if auth == "manual":
        typ = "dns-01" if "dns-01" in _as_list(params.get("pref_challs")) else "http-01"
        return typ, None, [f"certbot's manual authenticator -> {typ}; its hooks are not carried over"]
    raise InvalidInput(f"certbot authenticator {auth!r} has no certqueue equivalent", field="authenticator")


def key_type_of_params(params: Mapping[str, str]) -> str | None:
    """certqueue's key type for certbot's ``key_type`` with ``elliptic_curve`` or ``rsa_key_size``."""
    kind = params.get("key_type", "").strip().lower()
    if kind == "ecdsa":
        curve = params.get("elliptic_curve", "secp256r1").strip().lower()
        return CURVES.get(curve)
    if kind == "rsa" or (not kind and params.get("rsa_key_size")):
        size = params.get("rsa_key_size", "2048").strip()
        return f"rsa{size}" if f"rsa{size}" in validation.KEY_TYPES else None
    return None


def read_certbot(directory: Path) -> list[Candidate]:
    """One candidate per ``renewal/*.conf`` of a certbot directory, in name order. Files are read
    through certbot's ``live/`` symlinks into ``archive/``; a lineage that cannot be read is a
    candidate with its ``error``. Raises InvalidInput when the directory holds no lineage."""
    confs = sorted((directory / "renewal").glob("*.conf"))
    if not confs:
        raise InvalidInput(f"no certbot lineage in {directory} (no renewal/*.conf)", field="directory")
    return [_read_lineage(directory, conf) for conf in confs]


def _read_lineage(directory: Path, conf: Path) -> Candidate:
    name = conf.name.removesuffix(".conf")
    try:
        parsed = parse_renewal_conf(conf.read_text())
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        return Candidate("certbot", name, error=f"cannot read {conf}: {_why(exc)}")
    top, params = parsed.get("", {}), parsed.get("renewalparams", {})
    # certbot's live/<name>/ files are the served ones; the conf's paths are where they point
    live = directory / "live" / name
    paths = {
        "fullchain": live / "fullchain.pem" if (live / "fullchain.pem").exists() else top.get("fullchain"),
        "privkey": live / "privkey.pem" if (live / "privkey.pem").exists() else top.get("privkey"),
    }
    pems: dict[str, str] = {}
    for label, path in paths.items():
        if not path:
            return Candidate("certbot", name, error=f"{conf.name} names no {label} and {live} has none")
        try:
            pems[label] = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            link = Path(path)
            shown = f"{link} (a link to {link.readlink()})" if link.is_symlink() else str(link)
            return Candidate("certbot", name, error=f"cannot read {label} {shown}: {_why(exc)}")
    try:
        challenge, provider, notes = challenge_for_authenticator(params.get("authenticator", ""), params)
    except InvalidInput as exc:
        return Candidate("certbot", name, error=exc.message)
    return Candidate(
        "certbot",
        name,
        fullchain_pem=pems["fullchain"],
        key_pem=pems["privkey"],
        challenge_type=challenge,
        dns_provider=provider,
        directory_url=params.get("server") or None,
        key_type=key_type_of_params(params),
        reuse_key=params.get("reuse_key", "").strip().lower() == "true",
        notes=tuple(notes),
    )


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


# --- cert-manager ---------------------------------------------------------------------------------


def read_kubectl_json(text: str) -> list[Candidate]:
    """One candidate per Secret in ``kubectl get secret -o json`` output (a Secret or a List).
    Raises InvalidInput when the text is not such JSON or holds no Secret."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not JSON from kubectl: {exc}", field="file") from None
    if not isinstance(doc, dict):
        raise InvalidInput("not a Secret or a List of them", field="file")
    items = doc.get("items") if doc.get("kind") == "List" or "items" in doc else [doc]
    if not isinstance(items, list) or not items:
        raise InvalidInput("no Secret in the input", field="file")
    return [secret_candidate(item, i) for i, item in enumerate(items)]


def challenge_from_annotations(annotations: Mapping[str, str]) -> tuple[str, str | None, list[str]]:
    """(challenge type, DNS provider, notes) for a Secret: ``certqueue.io/challenge`` (and
    ``certqueue.io/dns-provider``) when set; http-01 when cert-manager's ``acme.cert-manager.io/
    http01-*`` annotations say so, or when nothing says otherwise (cert-manager keeps the solver in
    the Issuer, not on the Secret)."""
    explicit = annotations.get(CHALLENGE_ANNOTATION)
    provider = annotations.get(DNS_PROVIDER_ANNOTATION) or None
    if explicit:
        if explicit not in certificates.CHALLENGE_TYPES:
            raise InvalidInput(
                f"annotation {CHALLENGE_ANNOTATION}={explicit!r}: use one of"
                f" {', '.join(certificates.CHALLENGE_TYPES)}",
                field="challenge_type",
            )
        return explicit, provider, [f"challenge {explicit} from annotation {CHALLENGE_ANNOTATION}"]
    if any(k.startswith(CM_HTTP01_PREFIX) for k in annotations):
        return "http-01", provider, [f"http-01 from the {CM_HTTP01_PREFIX}* annotations"]
    return (
        "http-01",
        provider,
        [f"no challenge annotation: http-01 (set {CHALLENGE_ANNOTATION} to choose another)"],
    )


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def secret_candidate(item: Any, index: int = 0) -> Candidate:
    """One Secret (a kubectl JSON object) as a candidate; what is wrong with it is its ``error``."""
    if not isinstance(item, dict):
        return Candidate("cert-manager", f"item {index}", error="not a JSON object")
    meta = _object(item.get("metadata"))
    name = f"{meta.get('namespace') or 'default'}/{meta.get('name') or f'item {index}'}"
    if item.get("kind", "Secret") != "Secret" or item.get("type") != TLS_SECRET_TYPE:
        return Candidate(
            "cert-manager",
            name,
            error=f"not a {TLS_SECRET_TYPE} Secret ({item.get('kind')}, {item.get('type')})",
        )
    data = _object(item.get("data"))
    pems: dict[str, str] = {}
    for k in ("tls.crt", "tls.key"):
        try:
            pems[k] = base64.b64decode(data.get(k) or "", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return Candidate("cert-manager", name, error=f"data[{k!r}] is not base64 PEM")
        if not pems[k].strip():
            return Candidate("cert-manager", name, error=f"data[{k!r}] is empty")
    annotations = {k: str(v) for k, v in _object(meta.get("annotations")).items()}
    try:
        challenge, provider, notes = challenge_from_annotations(annotations)
    except InvalidInput as exc:
        return Candidate("cert-manager", name, error=exc.message)
    return Candidate(
        "cert-manager",
        name,
        fullchain_pem=pems["tls.crt"],
        key_pem=pems["tls.key"],
        challenge_type=challenge,
        dns_provider=provider,
        issuer_name=annotations.get(CM_ISSUER_ANNOTATION) or None,
        notes=tuple(notes),
    )


# --- checking and writing -------------------------------------------------------------------------


def choose_issuer(settings: Settings, cand: Candidate) -> tuple[issuers.Issuer, list[str]]:
    """The configured issuer for the candidate's directory URL (or issuer name), else the default,
    with a note naming the one chosen when it is not the one the source used."""
    every = issuers.all_issuers(settings)
    if cand.directory_url:
        url = cand.directory_url.rstrip("/")
        for i in every:
            if i.directory_url.rstrip("/") == url:
                return i, []
        default = every[0]
        return default, [
            f"{cand.directory_url} is no configured issuer's directory: renewed through the"
            f" default CA {default.directory_url}"
        ]
    if cand.issuer_name:
        for i in every:
            if i.name == cand.issuer_name:
                return i, []
        default = every[0]
        return default, [
            f"issuer {cand.issuer_name!r} is not configured here: renewed through the"
            f" default CA {default.directory_url}"
        ]
    return every[0], []


def plan(cand: Candidate, settings: Settings) -> Plan:
    """Check a candidate: its certificate and key (certqueue.certificates.read_external) and the
    request its renewals will make (CertificateRequest.build). Raises InvalidInput."""
    if cand.error:
        raise InvalidInput(cand.error)
    if cand.fullchain_pem is None or cand.key_pem is None:
        raise InvalidInput("no certificate or no key")
    ext = certificates.read_external(cand.fullchain_pem, cand.key_pem)
    iss, notes = choose_issuer(settings, cand)
    key_type = cand.key_type or ext.info.key_type
    if key_type not in validation.KEY_TYPES:
        notes.append(f"its key is {key_type}; renewed with {iss.key_type} keys")
        key_type = iss.key_type
    challenge = cand.challenge_type or "http-01"
    wild = [d for d in ext.domains if d.startswith("*.")]
    if wild and challenge != "dns-01":
        raise InvalidInput(
            f"{wild[0]}: wildcard names need dns-01, and {cand.name} would renew with {challenge}",
            field="challenge_type",
        )
    try:
        req = certificates.CertificateRequest.build(
            settings,
            domains=ext.domains,
            challenge_type=challenge,
            dns_provider=cand.dns_provider,
            key_type=key_type,
            reuse_key=cand.reuse_key,
            issuer=iss.name if iss.name != issuers.DEFAULT else None,
        )
    except InvalidInput as exc:
        if exc.field == "dns_provider" and cand.notes:  # say which plugin had no provider
            raise InvalidInput(f"{exc.message}: {cand.notes[-1]}", field=exc.field) from None
        raise
    return Plan(cand, ext, req, iss.name, [*cand.notes, *notes])


def adopt(session: Session, p: Plan, *, actor: str, settings: Settings) -> tuple[Certificate, bool]:
    """Write one plan in the caller's transaction: a certificate row for its names with the current
    certificate and key as its issuance, ACTIVE (renewal scheduled as for an issued certificate) or,
    with regions and ``sync`` propagation, ISSUED with a propagation intent, as the pipeline does.
    Returns (certificate, whether a propagation intent was recorded). Raises InvalidInput when a
    name is already managed."""
    for d in p.request.domains:
        held = list_certificates(session, states_in=[s.value for s in LIVE_STATES], domain=d, limit=1)
        if held:
            raise InvalidInput(f"{d} is already managed ({held[0].id})", field="domains")
    cert, created = certificates.create_certificate(session, p.request, actor=actor)
    if not created:  # the same names and key type: found above unless a request raced this one
        raise InvalidInput(f"{', '.join(p.request.domains)} is already managed ({cert.id})", field="domains")
    ext = p.external
    events.record(
        session,
        cert.id,
        "adopted",
        actor=actor,
        data={"source": p.candidate.source, "serial": ext.info.serial},
    )
    events.transition(session, cert, State.ISSUING, reason="adopted", actor=actor)
    key = ext.key_pem.encode() if ext.key_pem else None
    iss = certificates.store_issuance(session, cert, ext.leaf_pem + ext.chain_pem, key, settings=settings)
    events.transition(session, cert, State.ISSUED, reason="adopted", actor=actor)
    _active, propagating = certificates.issuance_in_hand(
        session, cert, iss, reason="adopted", actor=actor, settings=settings
    )
    return cert, propagating is not None


@dataclass
class Outcome:
    """What became of one candidate (the CLI's row and JSON object)."""

    source: str
    name: str
    status: str  # "adopted", "would adopt", "failed"
    certificate_id: str | None = None
    domains: list[str] = field(default_factory=list)
    expires: str | None = None
    challenge: str | None = None
    dns_provider: str | None = None
    ca: str | None = None
    state: str | None = None
    renew_at: str | None = None
    #: a propagation intent was recorded (the certificate has regions)
    propagating: bool = False
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def adopt_all(
    candidates: Sequence[Candidate], *, settings: Settings, actor: str, dry_run: bool = False
) -> list[Outcome]:
    """Each candidate in its own transaction: a bad one writes nothing and the others go on. With
    ``dry_run`` each is written and rolled back, so what it says is what adopting would do."""
    from certqueue.db import sessionmaker_for

    out: list[Outcome] = []
    for cand in candidates:
        o = Outcome(cand.source, cand.name, "failed", notes=list(cand.notes))
        out.append(o)
        session = sessionmaker_for()()
        try:
            p = plan(cand, settings)
            o.domains, o.notes = list(p.request.domains), p.notes
            o.expires = p.external.info.not_after.isoformat()
            o.challenge, o.dns_provider, o.ca = p.request.challenge_type, p.request.dns_provider, p.ca
            cert, o.propagating = adopt(session, p, actor=actor, settings=settings)
            o.state = str(cert.state)
            o.renew_at = cert.renew_at.isoformat() if cert.renew_at else None
            if dry_run:
                session.rollback()
                o.status = "would adopt"
            else:
                session.commit()
                o.status, o.certificate_id = "adopted", cert.id
        except (InvalidInput, InvalidTransition) as exc:
            session.rollback()
            o.error = exc.message
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
    return out
