"""``certqueue demo``: the whole system on the embedded default, against a local Pebble.

Starts Pebble (and BIND9 for DNS-01 when it is installed, else pebble-challtestsrv), the HTTP-01
responder, one worker serving every queue, and beat; issues real certificates (a SAN certificate,
a single name, and a wildcard through DNS-01 when BIND is there), deploys them to a local-files
region, renews one, revokes one, prints the inventory and stops everything it started.
Everything lives under ``var/demo`` and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

console = Console()


def _wait(label: str, check: Any, timeout: float = 120.0) -> None:
    with console.status(label):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
    raise TimeoutError(f"timed out: {label}")


#: why ``certqueue demo`` cannot run from an installed wheel (one line, through the CLI's error path)
NO_CHECKOUT = (
    "certqueue demo runs from a source checkout: its test servers (devstack/) are not installed; "
    "run `make demo` at the root of a clone of the repository"
)


def run_demo(keep: bool = False, workdir: Path | None = None) -> int:
    from certqueue.errors import CertqueueError

    try:
        # the checkout's root on sys.path (`make demo` runs `python -m certqueue demo` from there)
        from devstack.pebble import ChallTestSrv, PebbleServer
        from devstack.ports import free_port
        from devstack.stack import Stack
    except ImportError:
        raise CertqueueError(NO_CHECKOUT) from None
    from certqueue import certificates
    from certqueue.celery_app import lazy_app
    from certqueue.cli_output import print_inventory
    from certqueue.config import load_settings, set_settings
    from certqueue.db import dispose_all, session_scope
    from certqueue.keystore import generate_key_file
    from certqueue.models import Certificate, Issuance

    work = (workdir or Path("var/demo")).resolve()
    if work.exists():
        shutil.rmtree(work)
    (work / "settings").mkdir(parents=True)
    deployed = work / "deployed"
    cleanups: list[Any] = []
    bind = None
    try:
        try:
            from devstack.bind import BindServer

            bind = BindServer(zone="example.test").start()
            cleanups.append(bind.stop)
            dns_server = bind.nameserver
            console.print(f"[dim]BIND9 for example.test on {bind.nameserver} (RFC2136 with TSIG)[/]")
        except Exception as exc:  # noqa: BLE001  (BIND is optional for the demo)
            console.print(f"[yellow]BIND9 not available ({type(exc).__name__}); DNS-01 skipped[/]")
            bind = None
            cts = ChallTestSrv().start()
            cleanups.append(cts.stop)
            dns_server = cts.dns_address
        http_port = free_port()
        pebble = PebbleServer(http_port=http_port, dns_server=dns_server).start()
        cleanups.append(pebble.stop)
        console.print(f"[dim]Pebble ACME CA at {pebble.directory_url}[/]")
        key = work / "master.key"
        generate_key_file(key)
        env = {
            "CERTQUEUE_SETTINGS_DIR": str(work / "settings"),
            "CERTQUEUE_DATABASE__URL": f"sqlite:///{work / 'certqueue.db'}",
            "CERTQUEUE_BROKER__FILESYSTEM_PATH": str(work / "broker"),
            "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(key),
            "CERTQUEUE_ACME__DIRECTORY_URL": pebble.directory_url,
            "CERTQUEUE_ACME__CA_BUNDLE": str(pebble.ca_bundle),
            "CERTQUEUE_ACME__EMAIL": "admin@example.test",
            "CERTQUEUE_CHALLENGES__HTTP_PORT": str(http_port),
            "CERTQUEUE_CHALLENGES__HTTP_HOST": "127.0.0.1",
            # a test CA: budgets far above Let's Encrypt's, so the limiter runs without deferring
            "CERTQUEUE_RATE_LIMITS__CERTIFICATES_PER_REGISTERED_DOMAIN": "1000000",
            "CERTQUEUE_RATE_LIMITS__DUPLICATE_CERTIFICATES": "10000",
            "CERTQUEUE_RATE_LIMITS__NEW_ORDERS_PER_ACCOUNT": "1000000",
            "CERTQUEUE_AUTOMATION__POLL_INITIAL_SECONDS": "0.1",
            "CERTQUEUE_MULTI_REGION__ENABLED": "true",
            "CERTQUEUE_MULTI_REGION__REGIONS": json.dumps(
                [{"name": "local-files", "provider": "local", "path": str(deployed)}]
            ),
        }
        if bind is not None:
            env["CERTQUEUE_CHALLENGES__RFC2136"] = json.dumps(
                bind.provider_config(propagation_timeout=30, polling_interval=0.3)
            )
            env["CERTQUEUE_CHALLENGES__DNS_RESOLVERS"] = json.dumps([bind.nameserver])
            env["CERTQUEUE_CHALLENGES__NAMESERVER_PORT"] = str(bind.port)
        set_settings(load_settings(environ=env, directory=work / "settings").settings)
        dispose_all()
        certificates.forget_keystores()
        lazy_app.reset()
        stack = Stack(workdir=work, env=env)
        cleanups.append(stack.stop_all)
        stack.cli("db", "upgrade")
        with console.status("starting the HTTP-01 responder, a worker for every queue, and beat"):
            stack.start_http01(http_port)
            stack.start_worker("all", concurrency=2)
            stack.start_beat()
        console.print(
            "[green]stack up[/]: http01 responder, worker (acme, dns, scan, propagate.local-files), beat"
        )

        requests: list[dict[str, Any]] = [
            {"domains": ["shop.example.test", "www.shop.example.test", "api.shop.example.test"]},
            {"domains": ["blog.example.test"]},
        ]
        if bind is not None:
            requests.append(
                {
                    "domains": ["*.apps.example.test", "apps.example.test"],
                    "challenge_type": "dns-01",
                    "dns_provider": "rfc2136",
                }
            )
        ids: list[str] = []
        t0 = time.monotonic()
        for kw in requests:
            with session_scope() as s:
                cert, _ = certificates.create_certificate(
                    s, certificates.CertificateRequest.build(**kw), actor="demo"
                )
                ids.append(cert.id)
            lazy_app.get().send_task(
                "certqueue.issue", args=[{"v": 1, "certificate_id": ids[-1]}], queue="acme"
            )
            console.print(f"requested {ids[-1]}: {', '.join(kw['domains'])}")

        def states() -> dict[str, str]:
            with session_scope(write=False) as s:
                return {i: s.get(Certificate, i).state for i in ids}  # type: ignore[union-attr]

        _wait("issuing and deploying", lambda: all(v in ("ACTIVE", "FAILED") for v in states().values()))
        console.print(
            f"issued and deployed {len(ids)} certificates in {time.monotonic() - t0:.1f}s: {states()}"
        )
        if any(v == "FAILED" for v in states().values()):
            console.print(stack.all_logs()[-4000:])
            return 1

        renew_id, revoke_id = ids[1], ids[0]

        def issuances(cid: str) -> int:
            with session_scope(write=False) as s:
                return int(s.execute(select(func.count()).where(Issuance.certificate_id == cid)).scalar_one())

        lazy_app.get().send_task(
            "certqueue.renew", args=[{"v": 1, "certificate_id": renew_id, "force": True}], queue="acme"
        )
        _wait(f"renewing {renew_id}", lambda: issuances(renew_id) == 2 and states()[renew_id] == "ACTIVE")
        console.print(f"renewed {renew_id}: a new key and certificate, the old one kept for audit")
        lazy_app.get().send_task(
            "certqueue.revoke",
            args=[{"v": 1, "certificate_id": revoke_id, "reason": "keyCompromise"}],
            queue="acme",
        )
        _wait(f"revoking {revoke_id}", lambda: states()[revoke_id] == "REVOKED")
        with session_scope(write=False) as s:
            c = s.get(Certificate, revoke_id)
            assert c is not None and c.current_issuance_id is not None
            serial = s.get(Issuance, c.current_issuance_id).serial  # type: ignore[union-attr]
        ca_view = pebble.cert_status(serial)
        console.print(f"revoked {revoke_id}: the CA reports serial {serial} as {ca_view.get('Status')}")

        with session_scope(write=False) as s:
            rows = []
            for c in certificates.list_certificates(s, limit=100):
                iss = s.get(Issuance, c.current_issuance_id) if c.current_issuance_id else None
                rows.append(
                    {
                        "id": c.id,
                        "domains": c.domains,
                        "state": c.state,
                        "not_after": iss.not_after.isoformat() if iss else None,
                        "issuer": iss.issuer if iss else None,
                    }
                )
        print_inventory(rows)
        table = Table(title=f"deployed to local files ({deployed})")
        table.add_column("certificate")
        table.add_column("files")
        for d in sorted(p for p in deployed.iterdir() if p.is_dir()):
            table.add_row(
                d.name, ", ".join(sorted(f.name for f in d.iterdir() if not f.name.startswith(".")))
            )
        console.print(table)
        if keep:
            console.print("stack left running; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception:  # noqa: BLE001, S110  (best effort: stopping what we started)
                pass
        set_settings(None)
