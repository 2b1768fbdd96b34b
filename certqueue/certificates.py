"""Certificate requests and the inventory: creating rows (validated, de-duplicated), importing
externally issued certificates, storing issuances with their encrypted keys, and reading them back.

Owns the creation of ``certificates`` rows and ``issuances`` rows. State changes go through
``certqueue.events``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from certqueue import events, intents, issuers, solvers, validation
from certqueue.acme.identifiers import check_ip_identifiers
from certqueue.config import Settings, get_settings
from certqueue.errors import InvalidInput, NotFound
from certqueue.inventory import get, list_certificates  # noqa: F401  (public names, kept here)
from certqueue.lifecycle import renewal, states
from certqueue.models import LIVE_STATES, Certificate, Intent, Issuance, State, utcnow

if TYPE_CHECKING:  # the key and certificate stack (cryptography) is imported where a PEM is read:
    # a request (the CLI's ``issue``, the API) needs none of it
    from certqueue import crypto
    from certqueue.keystore import KeyStore

CHALLENGE_TYPES = ("http-01", "dns-01", "tls-alpn-01")


def keystore(settings: Settings | None = None) -> KeyStore:
    """The process's key store: loaded once per key file (PBKDF2 is slow on purpose), and again
    when the file changes (``certqueue.keystore.current``: key rotation without a restart)."""
    from certqueue import keystore as keystore_file

    settings = settings or get_settings()
    return keystore_file.current(settings.storage.encryption_key_path)


def forget_keystores() -> None:
    from certqueue import keystore as keystore_file

    keystore_file.forget()


def issuance_aad(certificate_id: str, fingerprint: str) -> bytes:
    """What an issuance's encrypted key is bound to (AES-GCM associated data): its row, its cert."""
    return f"issuances:{certificate_id}:{fingerprint}:key".encode()


def order_key_aad(certificate_id: str, csr_pem: str) -> bytes:
    """What an order's encrypted key is bound to: its certificate and its CSR."""
    return f"orders:{certificate_id}:{hashlib.sha256(csr_pem.encode()).hexdigest()}:key".encode()


@dataclass
class CertificateRequest:
    """A validated request for a certificate (from the API, the CLI, a client task, the manager)."""

    domains: list[str]
    email: str | None = None
    key_type: str = "ec256"
    key_size: int | None = None
    challenge_type: str = "http-01"
    challenge_map: dict[str, str] = field(default_factory=dict)
    dns_provider: str | None = None
    profile: str | None = None
    preferred_chain: str | None = None
    directory_url: str | None = None
    #: CAs to fall back to, in order, after ``directory_url`` fails for good
    fallback_directory_urls: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    auto_renew: bool = True
    reuse_key: bool = False
    organization: str | None = None
    country: str | None = None
    state: str | None = None
    locality: str | None = None
    #: the named issuer chosen (certqueue.issuers); its directory and fallbacks are the URLs above
    issuer: str | None = None

    @classmethod
    def build(cls, settings: Settings | None = None, **kw: Any) -> CertificateRequest:
        """Validate everything before anything is written; bad input raises InvalidInput."""
        settings = settings or get_settings()
        iss = _issuer_of(settings, kw)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kw) - known - {"force_new_key", "staging"})
        if unknown:
            raise InvalidInput(f"unknown parameter(s): {', '.join(unknown)}", field=unknown[0])
        # IP addresses are checked against the CA's profile below (certqueue.acme.identifiers)
        domains = validation.normalize_domains(kw.get("domains") or [], allow_ip=True)
        email = kw.get("email") or (iss.email if iss else settings.acme.email)
        email = validation.validate_email(email) if email else None
        key_size = kw.get("key_size")
        if key_size is not None:
            validation.validate_key_size(key_size)  # not int(): "abc" must be InvalidInput, not ValueError
        try:
            key_type = (
                validation.key_type_from(key_size=key_size, key_type=kw.get("key_type"))
                if (key_size or kw.get("key_type"))
                else (iss.key_type if iss else settings.acme.key_type)
            )
        except (ValueError, InvalidInput) as exc:
            raise InvalidInput(str(exc), field=getattr(exc, "field", None) or "key_type") from None
        challenge_type = kw.get("challenge_type") or settings.challenges.default_type
        if challenge_type not in CHALLENGE_TYPES:
            raise InvalidInput(
                f"challenge_type must be one of {', '.join(CHALLENGE_TYPES)}", field="challenge_type"
            )
        cmap_in = kw.get("challenge_map") or {}
        if not isinstance(cmap_in, dict):
            raise InvalidInput("challenge_map must map names to challenge types", field="challenge_map")
        cmap: dict[str, str] = {}
        for name, typ in cmap_in.items():
            norm = validation.normalize_domains([name], allow_ip=True)[0]
            if norm not in domains:
                raise InvalidInput(
                    f"challenge_map names {norm}, which is not requested", field="challenge_map"
                )
            if typ not in CHALLENGE_TYPES:
                raise InvalidInput(f"unknown challenge type {typ!r}", field="challenge_map")
            cmap[norm] = typ
        if settings.challenges.solvers:
            # named solvers choose the type of every name the request does not set (certqueue.solvers)
            cmap = solvers.challenge_map(settings, domains, kw.get("challenge_type"), cmap)
        for d in domains:
            if d.startswith("*.") and cmap.get(d, challenge_type) != "dns-01":
                raise InvalidInput(
                    f"{d}: wildcard names can only be validated with dns-01", field="challenge_type"
                )
        dns_provider = kw.get("dns_provider") or settings.challenges.dns_provider
        unsolved = [
            d
            for d in domains
            if cmap.get(d, challenge_type) == "dns-01" and solvers.dns_solver_for(settings, d) is None
        ]
        needs_dns = bool(unsolved)
        if needs_dns and not dns_provider:
            raise InvalidInput(
                "dns-01 needs a dns_provider (argument or challenges.dns_provider)", field="dns_provider"
            )
        if dns_provider and (kw.get("dns_provider") or needs_dns):
            validation.validate_dns_provider(dns_provider)
        targets = list(kw.get("targets") or [])
        known_regions = {r.name for r in settings.multi_region.regions}
        for t in targets:
            if t not in known_regions:
                raise InvalidInput(f"unknown region {t!r}", field="targets")
        country = kw.get("country")
        if country:
            country = validation.validate_country(country)
        for fname in ("organization", "state", "locality", "profile", "preferred_chain"):
            v = kw.get(fname)
            if v is not None and (not isinstance(v, str) or len(v) > 128 or any(ord(c) < 32 for c in v)):
                raise InvalidInput(f"{fname} must be a short printable string", field=fname)
        directory_url = kw.get("directory_url") or (iss.directory_url if iss else settings.acme.directory)
        fallbacks = kw.get("fallback_directory_urls")
        if fallbacks is None and iss is not None:
            fallbacks = issuers.fallback_urls(settings, iss)
        if fallbacks is None:
            fallbacks = settings.acme.fallback_directory_urls if not kw.get("directory_url") else []
        if not isinstance(fallbacks, list | tuple):
            raise InvalidInput(
                "fallback_directory_urls must be a list of URLs", field="fallback_directory_urls"
            )
        for url in [directory_url, *fallbacks]:
            if not isinstance(url, str) or not url.startswith(("https://", "http://")) or len(url) > 512:
                raise InvalidInput(f"not an http(s) ACME directory URL: {url!r}", field="directory_url")
        fallbacks = [u for u in dict.fromkeys(fallbacks) if u != directory_url]
        profile = kw.get("profile") or (iss.profile if iss else settings.acme.profile)
        check_ip_identifiers(
            domains,
            profile=profile,
            allowed_profiles=iss.ip_identifier_profiles if iss else settings.acme.ip_identifier_profiles,
            challenge_type=challenge_type,
            challenge_map=cmap,
        )
        return cls(
            domains=domains,
            email=email,
            key_type=key_type,
            key_size=key_size,
            challenge_type=challenge_type,
            challenge_map=cmap,
            dns_provider=dns_provider,
            profile=profile,
            preferred_chain=kw.get("preferred_chain")
            or (iss.preferred_chain if iss else settings.acme.preferred_chain),
            directory_url=directory_url,
            fallback_directory_urls=list(fallbacks),
            targets=targets,
            auto_renew=bool(kw.get("auto_renew", settings.automation.auto_renew)),
            reuse_key=bool(kw.get("reuse_key", False)),
            organization=kw.get("organization"),
            country=country,
            state=kw.get("state"),
            locality=kw.get("locality"),
            issuer=iss.name if iss else None,
        )

    @property
    def dedupe_key(self) -> str:
        material = "\n".join([*sorted(self.domains), self.key_type, self.directory_url or ""])
        return hashlib.sha256(material.encode()).hexdigest()


def _issuer_of(settings: Settings, kw: dict[str, Any]) -> issuers.Issuer | None:
    name = kw.get("issuer")
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidInput("issuer must be the name of a configured issuer", field="issuer")
    if kw.get("directory_url"):
        raise InvalidInput("choose an issuer or a directory_url, not both", field="issuer")
    return issuers.get(settings, name)


def create_certificate(
    session: Session, req: CertificateRequest, *, actor: str = "certqueue", certificate_id: str | None = None
) -> tuple[Certificate, bool]:
    """Insert a REQUESTED certificate, or return the live one for the same names (created=False).

    Two requests for the same names at once give one row: the partial unique index on
    ``dedupe_key`` decides, and the loser reads the winner's row.
    """
    existing = find_live(session, req.dedupe_key)
    if existing is not None:
        return existing, False
    cert = Certificate(
        id=certificate_id or validation.new_certificate_id(),
        domains=req.domains,
        dedupe_key=req.dedupe_key,
        state=State.REQUESTED,
        key_type=req.key_type,
        key_size=req.key_size,
        challenge_type=req.challenge_type,
        challenge_map=req.challenge_map,
        dns_provider=req.dns_provider,
        profile=req.profile,
        preferred_chain=req.preferred_chain,
        directory_url=req.directory_url or "",
        directory_urls=[req.directory_url, *req.fallback_directory_urls]
        if req.fallback_directory_urls
        else None,
        email=req.email,
        targets=req.targets,
        auto_renew=req.auto_renew,
        reuse_key=req.reuse_key,
        organization=req.organization,
        country=req.country,
        state_province=req.state,
        locality=req.locality,
    )
    nested = session.begin_nested()
    try:
        session.add(cert)
        session.flush()
        nested.commit()
    except IntegrityError:
        nested.rollback()
        existing = find_live(session, req.dedupe_key)
        if existing is None:
            raise
        return existing, False
    events.record(
        session,
        cert.id,
        "requested",
        actor=actor,
        data={"domains": len(req.domains), "challenge_type": req.challenge_type},
    )
    return cert, True


def find_live(session: Session, dedupe_key: str) -> Certificate | None:
    return session.execute(
        select(Certificate).where(
            Certificate.dedupe_key == dedupe_key, Certificate.state.in_([s.value for s in LIVE_STATES])
        )
    ).scalar_one_or_none()


def store_issuance(
    session: Session,
    cert: Certificate,
    fullchain_pem: str,
    key_pem: bytes | None,
    *,
    order_url: str | None = None,
    settings: Settings | None = None,
    flush: bool = True,
) -> Issuance:
    """Parse, check and store an issued certificate with its private key encrypted. ``flush=False``:
    added, its id given at the caller's next flush (a batch stores many, then flushes once)."""
    from certqueue import crypto

    parsed = crypto.load_certificates(fullchain_pem)  # parsed once: the checks below take the leaf
    if not parsed:
        raise InvalidInput("no certificate in the chain", field="certificate_pem")
    pems = [crypto.cert_to_pem(c) for c in parsed]
    leaf_pem, chain = pems[0], "".join(pems[1:])
    info = crypto.cert_info(parsed[0])
    if key_pem is not None and not crypto.key_matches_certificate(key_pem, parsed[0]):
        raise InvalidInput("the private key does not match the certificate", field="private_key_pem")
    key_enc = (
        keystore(settings).encrypt(key_pem, issuance_aad(cert.id, info.fingerprint_sha256))
        if key_pem is not None
        else None
    )
    iss = Issuance(
        certificate_id=cert.id,
        serial=info.serial,
        not_before=info.not_before,
        not_after=info.not_after,
        cert_pem=leaf_pem,
        chain_pem=chain,
        key_enc=key_enc,
        key_type=info.key_type,
        fingerprint=info.fingerprint_sha256,
        issuer=info.issuer,
        order_url=order_url,
        ari_cert_id=_ari_cert_id(info),
    )
    session.add(iss)
    if flush:
        session.flush()
    return iss


def _ari_cert_id(info: crypto.CertInfo) -> str | None:
    """RFC 9773 certificate identifier; see :func:`certqueue.acme.ari.cert_id_from_info`."""
    from certqueue.acme.ari import cert_id_from_info  # imported here: keeps acme out of this import

    return cert_id_from_info(info)


def decrypt_key(iss: Issuance, settings: Settings | None = None) -> bytes:
    if iss.key_enc is None:
        raise NotFound(f"no private key stored for issuance {iss.id}")
    return keystore(settings).decrypt(iss.key_enc, issuance_aad(iss.certificate_id, iss.fingerprint))


def activate(
    session: Session,
    cert: Certificate,
    iss: Issuance,
    *,
    reason: str,
    settings: Settings | None = None,
    now: dt.datetime | None = None,
) -> None:
    """Make ``iss`` the served issuance and move the certificate to ACTIVE, scheduling renewal."""
    settings = settings or get_settings()
    cert.current_issuance_id = iss.id
    cert.not_after = iss.not_after
    cert.pending_issuance_id = None
    cert.attempts = 0
    cert.last_error = None
    cert.next_attempt_at = None
    cert.waiting_reason = None
    cert.work_deadline = None
    cert.force_new_key = False
    if cert.auto_renew and not cert.external:
        cert.renew_at = renewal.renew_at(
            iss.not_before,
            iss.not_after,
            settings.automation.renewal_threshold_days,
            jitter=settings.automation.renewal_jitter,
        )
    else:
        cert.renew_at = None
    # ask the CA's renewal information (if it has any) soon after activation; beat does the asking
    wants_ari = cert.auto_renew and not cert.external and bool(iss.ari_cert_id)
    cert.ari_next_check_at = (now or utcnow()) if wants_ari else None
    events.transition(session, cert, State.ACTIVE, reason=reason, data={"serial": iss.serial})


def issuance_in_hand(
    session: Session,
    cert: Certificate,
    iss: Issuance,
    *,
    reason: str,
    actor: str,
    settings: Settings | None = None,
    strategy: str | None = None,
) -> tuple[bool, Intent | None]:
    """What follows a stored issuance, wherever it came from (the pipeline, an import, an adoption):
    it is the one to deploy; a certificate with regions gets a propagate intent; it is served at once
    when ``lifecycle.states.active_on_issue`` says so (``strategy``: the settings' propagation
    strategy unless given), else when its regions hold it. Returns (ACTIVE now, the propagate intent
    or None)."""
    settings = settings or get_settings()
    cert.pending_issuance_id = iss.id
    has_regions = bool(regions_for(cert, settings))
    intent = intents.record(session, "propagate", cert.id, actor=actor) if has_regions else None
    if not states.active_on_issue(strategy or settings.multi_region.propagation_strategy, has_regions):
        return False, intent
    activate(session, cert, iss, reason=reason, settings=settings)
    return True, intent


@dataclass(frozen=True)
class ExternalCertificate:
    """A certificate issued elsewhere, parsed and checked: the leaf, its chain, its key (PEM)."""

    leaf_pem: str
    chain_pem: str
    key_pem: str | None
    info: crypto.CertInfo
    #: its DNS names (SANs, else the common name), normalized
    domains: list[str]


def read_external(
    certificate_pem: str, private_key_pem: str | None, chain_pem: str | None = None
) -> ExternalCertificate:
    """Parse and check a certificate issued elsewhere (``import``, ``certqueue.adopt``): PEM that
    parses, a chain that verifies, a key that matches, not expired, DNS names. InvalidInput if not."""
    from certqueue import crypto

    if isinstance(certificate_pem, str) and certificate_pem.count("-----BEGIN CERTIFICATE-----") > 1:
        # certbot's fullchain.pem (and most CAs' downloads): the leaf first, then its chain
        if chain_pem:
            raise InvalidInput(
                "the certificate file holds a chain already (a fullchain.pem) and a chain was given"
                " too: give the fullchain alone, or the certificate and its chain",
                field="chain_pem",
            )
        blocks = crypto.split_pem_chain(certificate_pem)
        certificate_pem, chain_pem = blocks[0], "".join(blocks[1:])
    leaf = validation.validate_pem(certificate_pem, "certificate")
    key = validation.validate_pem(private_key_pem, "private_key") if private_key_pem else None
    chain = validation.validate_pem(chain_pem, "chain") if chain_pem else ""
    validation.validate_import(leaf, key, chain or None)
    info = crypto.cert_info(leaf)
    if key and not crypto.key_matches_certificate(key, leaf):
        raise InvalidInput("the private key does not match the certificate", field="private_key_pem")
    if info.not_after <= utcnow():
        raise InvalidInput("the certificate has already expired", field="certificate_pem")
    names = [n for n in info.names if not _is_ip(n)] or ([info.common_name] if info.common_name else [])
    domains = validation.normalize_domains(names) if names else []
    if not domains:
        raise InvalidInput("the certificate names no DNS names", field="certificate_pem")
    return ExternalCertificate(leaf, chain, key, info, domains)


def store_external(
    session: Session,
    *,
    certificate_pem: str,
    private_key_pem: str | None,
    chain_pem: str | None = None,
    targets: Sequence[str] = (),
    actor: str = "certqueue",
    settings: Settings | None = None,
) -> tuple[Certificate, Issuance]:
    """Store an externally issued certificate (the guide's manual EV case) and its issuance: the
    row goes REQUESTED -> ISSUING -> ISSUED at once. What follows (ACTIVE, or a propagation) is
    ``issuance_in_hand``'s; ``operations.import_certificate`` is the whole import.

    It is monitored and propagated like any other, never renewed (there is no order to repeat); the
    expiry alerts cover it.
    """
    settings = settings or get_settings()
    ext = read_external(certificate_pem, private_key_pem, chain_pem)
    leaf, key, chain, info, domains = ext.leaf_pem, ext.key_pem, ext.chain_pem, ext.info, ext.domains
    known_regions = {r.name for r in settings.multi_region.regions}
    for t in targets:
        if t not in known_regions:
            raise InvalidInput(f"unknown region {t!r}", field="targets")
    cert = Certificate(
        id=validation.new_certificate_id(),
        domains=domains,
        dedupe_key=hashlib.sha256(f"import:{info.fingerprint_sha256}".encode()).hexdigest(),
        state=State.REQUESTED,
        key_type=info.key_type,
        challenge_type="none",
        directory_url="",
        targets=list(targets),
        auto_renew=False,
        external=True,
    )
    session.add(cert)
    try:
        session.flush()
    except IntegrityError:
        raise InvalidInput("this certificate is already imported", field="certificate_pem") from None
    events.record(session, cert.id, "imported", actor=actor, data={"serial": info.serial})
    events.transition(session, cert, State.ISSUING, reason="imported", actor=actor)
    iss = store_issuance(session, cert, leaf + chain, key.encode() if key else None, settings=settings)
    events.transition(session, cert, State.ISSUED, reason="imported", actor=actor)
    return cert, iss


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def regions_for(cert: Certificate, settings: Settings | None = None) -> list[str]:
    """The regions this certificate deploys to: its own list, else every configured region when
    multi-region is enabled, else none."""
    settings = settings or get_settings()
    if cert.targets:
        return list(cert.targets)
    if settings.multi_region.enabled:
        return [r.name for r in settings.multi_region.regions]
    return []
