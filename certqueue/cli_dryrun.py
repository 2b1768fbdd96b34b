"""``issue --dry-run`` and ``renew --dry-run`` (certbot's ``--dry-run``), and the staging twins of
known CAs (``--staging``).

A dry run is the real ACME exchange, now, in this process: an order for the request's names from the
staging directory (a CA with no known staging twin, such as a private CA or Pebble: its configured
directory, with a note saying so), its challenges presented with the configured solver and answered,
the order finalized and the certificate downloaded, then thrown away. Nothing is stored: no
certificate, order, issuance, account or key row. The one thing written is what the responders must
see while the CA validates: the HTTP-01 and TLS-ALPN-01 token rows (read by ``certqueue http01`` and
``certqueue tlsalpn01`` in other processes) and DNS-01 TXT records, all removed afterwards, success
or failure.

The pieces are the pipeline's own (certqueue.acme.client's AcmeClient, certqueue.solvers, the DNS
providers and the propagation check, certqueue.challenge_tokens); what is not reused is the
pipeline's bookkeeping (leases, rows, retries), which a dry run must not leave behind. The account is
the stored one for the directory and contact when there is one (read only); otherwise a throwaway
account is registered with a key kept in memory.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from certqueue.config import LETS_ENCRYPT_PRODUCTION, LETS_ENCRYPT_STAGING, Settings, get_settings
from certqueue.errors import CertqueueError, InvalidInput, PermanentError

log = logging.getLogger("certqueue.cli")

#: production directory -> its staging (test) twin, for the CAs that publish one; a staging
#: directory is its own twin
STAGING_TWINS = {
    LETS_ENCRYPT_PRODUCTION: LETS_ENCRYPT_STAGING,
    "https://dv.acme-v02.api.pki.goog/directory": "https://dv.acme-v02.test-api.pki.goog/directory",
}


def staging_twin(directory_url: str | None) -> str | None:
    """The staging directory of ``directory_url`` (itself when it is one), or None if none is known."""
    url = directory_url or LETS_ENCRYPT_PRODUCTION
    if url in STAGING_TWINS.values():
        return url
    return STAGING_TWINS.get(url)


def staging_directory(directory_url: str | None) -> str:
    """``--staging``: the staging twin, or InvalidInput naming the CA that has none."""
    from certqueue.logsafe import mask_url_password

    twin = staging_twin(directory_url)
    if twin is None:
        raise InvalidInput(
            f"{mask_url_password(directory_url or '')} has no known staging directory: drop --staging,"
            " or name a test CA's directory as an issuer (issuers[]) and use --issuer",
            field="staging",
        )
    return twin


@dataclass
class DryRunResult:
    names: list[str]
    directory_url: str
    ok: bool = False
    error: str | None = None
    reason: str | None = None
    #: what the user should know: no staging twin, a throwaway account
    notes: list[str] = field(default_factory=list)
    serial: str | None = None
    not_after: str | None = None
    certificate_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        from certqueue.logsafe import mask_url_password

        return {
            "certificate_id": self.certificate_id,
            "domains": self.names,
            "directory_url": mask_url_password(self.directory_url),
            "ok": self.ok,
            "error": self.error,
            "reason": self.reason,
            "notes": self.notes,
            "serial": self.serial,
            "not_after": self.not_after,
        }


def dry_run(
    req: Any, *, staging: bool, certificate_id: str | None = None, settings: Settings | None = None
) -> DryRunResult:
    """Run ``req`` (a certificates.CertificateRequest) through the CA now and store nothing. The
    CA's refusal (or a solver's) is the result's error, never raised; bad input is raised."""
    from certqueue.logsafe import mask_url_password

    settings = settings or get_settings()
    configured = req.directory_url or settings.acme.directory
    directory = staging_directory(configured) if staging else (staging_twin(configured) or configured)
    result = DryRunResult(list(req.domains), directory, certificate_id=certificate_id)
    if directory == configured and staging_twin(configured) is None:
        result.notes.append(
            f"{mask_url_password(configured)} has no known staging directory: the dry run orders from"
            " it (the certificate is thrown away)"
        )
    try:
        cert_pem = _run_order(req, directory, settings, result.notes)
    except CertqueueError as exc:
        result.error, result.reason = exc.message, exc.reason
        return result
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    result.ok = True
    result.serial = format(leaf.serial_number, "x")
    result.not_after = leaf.not_valid_after_utc.isoformat()
    return result


def _client(req: Any, directory: str, settings: Settings, notes: list[str]) -> Any:
    """A client signed by the stored account for (directory, contact), or by a throwaway one."""
    from certqueue import issuers
    from certqueue.acme.account import generate_account_key, register_account
    from certqueue.acme.accounts import current_key, make_client

    issuer = issuers.for_directory(settings, directory)
    contact = (issuer.email if issuer.name != issuers.DEFAULT and issuer.email else req.email) or ""
    key = current_key(directory, contact)  # the stored account's key, read only
    if key is not None:
        return make_client(directory, key, _account_url(directory, contact), settings)
    notes.append("no account stored for this directory: a throwaway account is registered (not kept)")
    client = make_client(directory, generate_account_key(issuer.account_key_type), None, settings)
    eab_key = issuer.eab_hmac_key(settings)
    register_account(
        client,
        contact or None,
        eab_kid=issuer.eab_kid if eab_key else None,
        eab_hmac_key=eab_key,
        agree_tos=settings.acme.agree_tos,
    )
    return client


def _account_url(directory: str, contact: str) -> str | None:
    from sqlalchemy import select

    from certqueue.db import session_scope
    from certqueue.models import Account

    with session_scope(write=False) as s:
        return s.execute(
            select(Account.account_url).where(Account.directory_url == directory, Account.contact == contact)
        ).scalar_one_or_none()


def _run_order(req: Any, directory: str, settings: Settings, notes: list[str]) -> str:
    from certqueue import crypto

    client = _client(req, directory, settings, notes)
    key_pem = crypto.new_private_key_pem(req.key_type)
    csr = crypto.make_csr(
        key_pem,
        req.domains,
        organization=req.organization,
        country=req.country,
        state=req.state,
        locality=req.locality,
        allow_ip=True,
    )
    order = client.new_order(csr, profile=req.profile)
    presented = _Presented(settings)
    try:
        infos = []
        for authz in order.authorizations:
            if getattr(authz.body.status, "name", authz.body.status) == "valid":
                continue  # the account proved this name recently
            ident = authz.body.identifier.value
            name = f"*.{ident}" if authz.body.wildcard else ident
            ctype = req.challenge_map.get(name, req.challenge_type)
            info = client.challenge_for(authz, ctype)
            presented.present(info, name, req.dns_provider)
            infos.append(info)
        presented.wait_visible()
        for info in infos:
            client.answer_challenge(info)
        deadline = time.monotonic() + settings.automation.order_timeout_seconds
        status = _poll(lambda: client.poll_authorizations(order), deadline, settings)
        if status.status == "invalid":
            problem = next(iter(status.problems.values()))
            raise PermanentError(
                f"authorization for {problem.identifier} is invalid: {problem.detail}", reason=problem.reason
            )
        order = client.finalize(status.order, csr)
        fullchain, _ = _poll_certificate(client, order, deadline, settings)
        return str(fullchain)
    finally:
        presented.remove()


def _poll(look: Callable[[], Any], deadline: float, settings: Settings) -> Any:
    pause = settings.automation.poll_initial_seconds
    while True:
        status = look()
        if status.status != "pending":
            return status
        if time.monotonic() > deadline:
            raise PermanentError("the CA did not validate the order in time", reason="acme:timeout")
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, settings.automation.poll_max_seconds)


def _poll_certificate(client: Any, order: Any, deadline: float, settings: Settings) -> Any:
    from certqueue.errors import RetryableError

    pause = settings.automation.poll_initial_seconds
    while True:
        try:
            return client.fetch_certificate(order, settings.acme.preferred_chain)
        except RetryableError:
            if time.monotonic() > deadline:
                raise PermanentError(
                    "the CA did not issue the certificate in time", reason="acme:timeout"
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, settings.automation.poll_max_seconds)


class _Presented:
    """The challenges a dry run has made answerable, removed by :meth:`remove` whatever happened."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens: list[str] = []  # http-01 and tls-alpn-01 token rows
        self.records: list[tuple[Any, str, str, Any]] = []  # (provider, fqdn, value, handle)

    def present(self, info: Any, name: str, dns_provider: str | None) -> None:
        from certqueue.db import session_scope
        from certqueue.models import Http01Token, TlsAlpn01Token, utcnow

        expires = utcnow() + dt.timedelta(seconds=self.settings.automation.order_timeout_seconds + 600)
        if info.type == "dns-01":
            from certqueue import solvers
            from certqueue.dns.zones import follow_cnames

            provider = solvers.load(
                self.settings, solvers.dns_solver_for(self.settings, name) or dns_provider or ""
            )
            fqdn = follow_cnames(info.dns_name, self._resolver())
            self.records.append((provider, fqdn, info.dns_value, None))
            handle = provider.present(fqdn, info.dns_value)
            self.records[-1] = (provider, fqdn, info.dns_value, handle)
            return
        # served by the responders in other processes: committed now, deleted in remove()
        self.tokens.append(info.token)
        with session_scope() as s:
            if info.type == "http-01":
                s.add(
                    Http01Token(
                        token=info.token,
                        key_authorization=info.key_authorization,
                        certificate_id="dry-run",
                        expires_at=expires,
                    )
                )
            else:
                s.add(
                    TlsAlpn01Token(
                        token=info.token,
                        identifier=name,
                        key_authorization=info.key_authorization,
                        certificate_id="dry-run",
                        expires_at=expires,
                    )
                )

    def _resolver(self) -> Any:
        from certqueue.dns.zones import Resolver

        c = self.settings.challenges
        return Resolver(nameservers=tuple(c.dns_resolvers), nameserver_port=c.nameserver_port)

    def wait_visible(self) -> None:
        """Every TXT record at every authoritative nameserver, within its provider's timeout."""
        from certqueue.dns.propagation import check_visible

        for provider, fqdn, value, _ in self.records:
            timeout, interval = provider.timeout()
            deadline = time.monotonic() + timeout
            while True:
                result = check_visible(
                    fqdn,
                    value,
                    resolver_cfg=self._resolver(),
                    also_recursive=self.settings.challenges.check_recursive,
                )
                if result.visible:
                    break
                if time.monotonic() > deadline:
                    raise PermanentError(
                        f"TXT record at {fqdn} not visible at every authoritative nameserver after"
                        f" {int(timeout)}s ({result.reason})",
                        reason="dns:not_visible",
                    )
                time.sleep(interval)

    def remove(self) -> None:
        from sqlalchemy import delete

        from certqueue.db import session_scope
        from certqueue.models import Http01Token, TlsAlpn01Token

        if self.tokens:
            with session_scope() as s:
                s.execute(delete(Http01Token).where(Http01Token.token.in_(self.tokens)))
                s.execute(delete(TlsAlpn01Token).where(TlsAlpn01Token.token.in_(self.tokens)))
        for provider, fqdn, value, handle in self.records:
            try:
                provider.cleanup(fqdn, value, handle)
            except CertqueueError as exc:  # the others are still removed; this one is said
                click.echo(f"warning: TXT record at {fqdn} not removed: {exc.message}", err=True)


def report(results: Sequence[DryRunResult], output: str) -> None:
    """What each dry run did: the CA's answer, or its error, on stdout; notes on stderr."""
    from certqueue.cli_output import Column, print_json, print_tsv

    if output == "json":
        data = [r.to_json() for r in results]
        print_json(data[0] if len(data) == 1 else data)
        return
    for r in results:
        for note in r.notes:
            click.echo(f"note: {note}", err=True)
    if output == "tsv":
        columns = [Column(k, k) for k in ("certificate_id", "domains", "ok", "serial", "not_after", "error")]
        print_tsv([r.to_json() for r in results], columns)
        return
    for r in results:
        who = f"{r.certificate_id} " if r.certificate_id else ""
        names = ", ".join(r.names)
        if r.ok:
            click.echo(f"dry run: {who}{names}: the CA issued a certificate (serial {r.serial}), not stored")
        else:
            click.echo(f"dry run: {who}{names}: failed: {r.error}")
