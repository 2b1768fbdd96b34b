"""The guide's ``CertificateStore``: certificates issued elsewhere, kept like any other (monitored,
propagated, never renewed by certqueue); the import goes through ``certqueue.operations``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select

from certqueue import certificates, crypto, operations, validation
from certqueue.config import Settings, get_settings
from certqueue.errors import ConfigError, InvalidInput
from certqueue.guide.manager import CertificateManager
from certqueue.guide.monitoring import expiring, parse_states
from certqueue.guide.views import Certificate, OperationFailed
from certqueue.models import Deployment, State

log = logging.getLogger("certqueue.manager")

STORE_BACKENDS = ("local", "aws", "azure")
LIST_FILTER_KEYS = frozenset({"state", "domain", "expiring_within_days", "limit"})


class CertificateStore:
    """Certificates issued elsewhere (the guide's store; its manual EV case), kept like any other:
    monitored, propagated, never renewed by certqueue.

    Every backend keeps the certificate in certqueue's database, its private key encrypted with
    AES-256-GCM under the key file (``encryption_key_path``). ``aws`` and ``azure`` additionally deploy
    it to the configured ``multi_region`` region of that provider (``aws_region`` matches a region
    with ``provider: aws`` whose ``region`` or ``name`` is that region; ``azure_key_vault_url`` one
    with ``provider: azure`` and that ``key_vault_url``): the propagate pool of that region does the
    import, as for every deployment. ``backend`` defaults to the ``storage.backend`` setting.
    ``storage_path`` is accepted for the guide's signature and not used (it is not a setting either):
    PEM files for web servers are the ``local`` *target*'s job (a region with ``provider: local``).
    """

    def __init__(
        self,
        backend: str | None = None,
        storage_path: str | None = None,
        encryption_key_path: str | None = None,
        aws_region: str | None = None,
        azure_key_vault_url: str | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        if backend is None:
            backend = (settings or get_settings()).storage.backend
        if backend not in STORE_BACKENDS:
            raise InvalidInput(f"backend must be one of {', '.join(STORE_BACKENDS)}", field="backend")
        self.backend = backend
        self.manager = CertificateManager(
            settings, storage_backend=backend, encryption_key_path=encryption_key_path
        )
        if storage_path is not None:
            log.info("CertificateStore: storage_path is not used (certificates live in the database)")
        for key, value in (
            ("storage.aws_region", aws_region),
            ("storage.azure_key_vault_url", azure_key_vault_url),
        ):
            if value is not None:
                self.manager.link.override(key, value)
        self.manager.settings  # noqa: B018  (validate now)

    def __repr__(self) -> str:
        return f"CertificateStore(backend={self.backend!r})"

    def backend_regions(self) -> list[str]:
        """The region(s) the backend deploys to (none for ``local``)."""
        s = self.manager.settings
        if self.backend == "local":
            return []
        if self.backend == "aws":
            want = s.storage.aws_region
            if not want:
                raise ConfigError("the aws backend needs storage.aws_region", key="storage.aws_region")
            for r in s.multi_region.regions:
                extra = r.model_extra or {}
                if r.target == "aws_acm" and (extra.get("region") or r.name) == want:
                    return [r.name]
            raise ConfigError(
                f"the aws backend needs a multi_region region with provider aws for {want}",
                key="multi_region.regions",
            )
        vault = (s.storage.azure_key_vault_url or "").rstrip("/")
        if not vault:
            raise ConfigError(
                "the azure backend needs storage.azure_key_vault_url", key="storage.azure_key_vault_url"
            )
        for r in s.multi_region.regions:
            extra = r.model_extra or {}
            if r.target == "azure_keyvault" and str(extra.get("key_vault_url") or "").rstrip("/") == vault:
                return [r.name]
        raise ConfigError(
            f"the azure backend needs a multi_region region with provider azure for {vault}",
            key="multi_region.regions",
        )

    async def store_certificate(
        self,
        certificate_id: str | None = None,
        certificate_pem: str = "",
        private_key_pem: str = "",
        domains: Sequence[str] | None = None,
        expires_at: dt.datetime | None = None,
        chain_pem: str | None = None,
        *,
        targets: Sequence[str] | None = None,
        wait: bool = True,
        timeout: float = 300,
    ) -> str:
        """Import a certificate and its key; returns the id certqueue gave it.

        certqueue assigns ids (``cert_`` and 20 random characters): pass no ``certificate_id`` and
        keep the returned one. The certificate is the source of truth: ``domains`` and
        ``expires_at``, when given, are checked against it (the same names; notAfter within a day,
        a naive datetime being UTC) and a mismatch is ``InvalidInput`` with nothing stored. With a
        backend region (or ``targets``) it is deployed there; ``wait`` waits until it is ACTIVE."""
        if certificate_id is not None:
            raise InvalidInput(
                "certqueue assigns certificate ids: leave certificate_id out and keep the returned id",
                field="certificate_id",
            )
        settings = self.manager.settings
        pems = crypto.split_pem_chain(certificate_pem) if certificate_pem else []
        if not pems:
            raise InvalidInput("certificate_pem holds no certificate", field="certificate_pem")
        leaf = validation.validate_pem(pems[0], "certificate")
        chain = chain_pem if chain_pem else ("".join(pems[1:]) or None)
        info = crypto.cert_info(leaf)
        if domains is not None:
            given = set(validation.normalize_domains(list(domains)))
            names = set(
                validation.normalize_domains(
                    [n for n in info.names if not _is_ip(n)] or [info.common_name or ""]
                )
            )
            if given != names:
                raise InvalidInput(
                    f"domains {sorted(given)} differ from the certificate's names {sorted(names)}",
                    field="domains",
                )
        if expires_at is not None:
            when = expires_at.replace(tzinfo=dt.UTC) if expires_at.tzinfo is None else expires_at
            if abs(when - info.not_after) > dt.timedelta(days=1):
                raise InvalidInput(
                    f"expires_at {when.isoformat()} differs from the certificate's notAfter "
                    f"{info.not_after.isoformat()}",
                    field="expires_at",
                )
        wanted_targets = list(targets or []) + [r for r in self.backend_regions() if r not in (targets or [])]

        def store() -> tuple[str, str | None]:
            with self.manager.link.session() as s:
                row, intent = operations.import_certificate(
                    s,
                    certificate_pem=leaf,
                    private_key_pem=private_key_pem,
                    chain_pem=chain,
                    targets=wanted_targets,
                    actor="store",
                    settings=settings,
                )
                return row.id, (f"intent-{intent.id}" if intent is not None else None)

        cid, task_id = await asyncio.to_thread(store)
        if task_id is None:
            return cid
        self.manager.link.nudge()
        if not wait:
            return cid

        def done() -> str | None:
            failure = self.manager.link.task_failure(task_id)
            with self.manager.link.session(write=False) as s:
                if certificates.get(s, cid).state == State.ACTIVE:
                    return cid
                failed = {
                    d.region: d.last_error or "failed"
                    for d in s.execute(
                        select(Deployment).where(
                            Deployment.certificate_id == cid, Deployment.status == "failed"
                        )
                    ).scalars()
                }
            if failed:
                raise OperationFailed(
                    f"{cid}: deployment failed: " + ", ".join(f"{r}: {e}" for r, e in sorted(failed.items())),
                    reason=next(iter(sorted(failed.values()))),
                    certificate_id=cid,
                )
            if failure is not None:
                raise failure
            return None

        return await self.manager.link.poll(done, timeout, f"{cid} to be deployed")

    async def get_certificate(self, certificate_id: str) -> Certificate:
        return await self.manager.get_certificate(certificate_id)

    async def list_certificates(self, filter: Mapping[str, Any] | None = None) -> list[Certificate]:
        """Certificates, oldest first. ``filter`` keys: ``state`` (a state or a list of them),
        ``domain`` (certificates naming it), ``expiring_within_days`` (in service, expiring within
        that many days, soonest first), ``limit`` (default 1000)."""
        f = dict(filter or {})
        unknown = sorted(set(f) - LIST_FILTER_KEYS)
        if unknown:
            raise InvalidInput(
                f"unknown filter key(s) {', '.join(unknown)}; use {', '.join(sorted(LIST_FILTER_KEYS))}",
                field="filter",
            )
        states_in = parse_states(f.get("state"))
        domain = f.get("domain")
        if domain is not None:
            domain = validation.normalize_domains([domain], allow_ip=True)[0]
        within = f.get("expiring_within_days")
        if within is not None and (
            isinstance(within, bool) or not isinstance(within, int | float) or within < 0
        ):
            raise InvalidInput("expiring_within_days must be a number of days >= 0", field="filter")
        limit = f.get("limit", 1000)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidInput("limit must be an integer from 1 to 100000", field="filter")
        if within is not None:
            return await expiring(self.manager.link, float(within), states_in, domain, limit)

        def run() -> list[Certificate]:
            with self.manager.link.session(write=False) as s:
                rows = certificates.list_certificates(s, states_in=states_in, domain=domain, limit=limit)
                return [self.manager.view(s, r) for r in rows]

        return await asyncio.to_thread(run)

    async def delete_certificate(self, certificate_id: str, *, force: bool = False) -> None:
        """Remove a certificate with its issuances, orders and deployment records. Only REVOKED,
        EXPIRED or FAILED ones unless ``force`` (a live one is still served: revoke it, or force).
        Copies deployed to targets are removed from them (regions with ``remove_on_delete``, the
        default), durably, after this returns; the audit log keeps its events."""

        def run() -> None:
            self.manager.link.request(
                lambda s: operations.delete_certificate(s, certificate_id, force=force, actor="store")
            )

        await asyncio.to_thread(run)


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
