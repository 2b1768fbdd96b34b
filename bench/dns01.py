"""DNS-01 throughput for wildcard certificates through BIND9 (RFC 2136, TSIG), certqueue against
lego's ``rfc2136`` provider. One BIND serves both; each client gets a fresh Pebble resolving through
that BIND (``-dnsserver``), so Pebble validates the TXT records for real.

Both clients check propagation the way they would in production, by asking the zone's authoritative
nameserver on port 53: BIND listens on port 53 of a loopback address of its own (``AUTH_ADDRESS``,
added to ``lo`` for the case when it is missing, removed afterwards), and the zone's NS record points
there. certqueue: ``challenges.dns_provider=rfc2136``, its propagation check with the shipped
``nameserver_port`` (53), real ``acme`` and ``dns`` worker pools. lego: ``--dns rfc2136`` with
``--dns.resolvers`` at BIND and its own propagation check; lego resolves the NS host name through the
system resolver, so each lego process runs in a private mount namespace (``unshare -m``) whose
``/etc/resolv.conf`` names BIND (the machine's own file is not touched).

Where that cannot be set up (not root, no ``ip``/``unshare``, port 53 of the address taken), BIND runs
on a high port of 127.0.0.1, lego runs with ``--dns.disable-cp`` (no propagation check: it would ask
the NS on port 53) and the cases' notes say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import peers
from bench.cq_issue import run_certqueue_timed
from bench.env import build_stack
from bench.report import CaseResult, RunReport
from devstack.bind import BindError, BindServer

log = logging.getLogger("bench")

# Not 127.0.0.53: systemd-resolved's stub listens there on many machines.
AUTH_ADDRESS = "127.53.0.1"
IP = "/usr/sbin/ip"
UNSHARE = "/usr/bin/unshare"


@dataclass
class Authority:
    """The BIND both clients use; ``resolv_conf`` is set when it answers on port 53 of its own
    address (lego's propagation check can run), ``why_not`` says why it does not."""

    bind: BindServer
    resolv_conf: Path | None = None
    why_not: str = ""

    @property
    def propagation_checked(self) -> bool:
        return self.resolv_conf is not None

    def wrap(self, argv: list[str]) -> list[str]:
        """Run ``argv`` with BIND as its system resolver, in a private mount namespace."""
        if self.resolv_conf is None:
            return argv
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return [
            UNSHARE,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(self.resolv_conf),
            *argv,
        ]


def _lo_has(address: str) -> bool:
    out = subprocess.run([IP, "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True, timeout=10)
    return f"inet {address}/" in out.stdout


def _namespaces_work(resolv_conf: Path) -> str:
    """'' if a private mount namespace with its own resolv.conf can be made here, else why not."""
    try:
        res = subprocess.run(
            Authority(BindServer(), resolv_conf).wrap(["cat", "/etc/resolv.conf"]),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError as exc:
        return f"unshare failed: {exc}"
    if res.returncode != 0 or AUTH_ADDRESS not in res.stdout:
        return f"unshare --mount failed: {(res.stderr or res.stdout).strip()[:200]}"
    return ""


@contextlib.contextmanager
def authority(zone: str = "example.test") -> Iterator[Authority]:
    """BIND on ``AUTH_ADDRESS``:53 with lego's resolver file, or (saying why) on a high port."""
    added = False
    why = ""
    tmp = Path(tempfile.mkdtemp(prefix="certqueue-bench-dns-"))
    try:
        if os.geteuid() != 0:
            why = "not root: cannot add a loopback address, bind port 53 or make a mount namespace"
        elif not (os.access(IP, os.X_OK) and os.access(UNSHARE, os.X_OK) and shutil.which("mount")):
            why = f"{IP}, {UNSHARE} or mount missing"
        elif not _lo_has(AUTH_ADDRESS):
            res = subprocess.run(
                [IP, "addr", "add", f"{AUTH_ADDRESS}/32", "dev", "lo"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if res.returncode != 0:
                why = f"ip addr add {AUTH_ADDRESS}/32 dev lo failed: {res.stderr.strip()[:200]}"
            else:
                added = True
        resolv = tmp / "resolv.conf"
        resolv.write_text(f"nameserver {AUTH_ADDRESS}\noptions timeout:2 attempts:2\n")
        resolv.chmod(0o644)
        if not why:
            why = _namespaces_work(resolv)
        bind: BindServer | None = None
        if not why:
            try:
                bind = BindServer(zone=zone, address=AUTH_ADDRESS, port=53).start()
            except BindError as exc:
                why = f"BIND on {AUTH_ADDRESS}:53 did not start: {str(exc)[:300]}"
        if bind is None:
            log.warning("DNS-01 without lego's propagation check: %s", why)
            bind = BindServer(zone=zone).start()
        try:
            yield Authority(bind, None if why else resolv, why)
        finally:
            bind.stop()
    finally:
        if added:
            subprocess.run(
                [IP, "addr", "del", f"{AUTH_ADDRESS}/32", "dev", "lo"], capture_output=True, timeout=10
            )
        shutil.rmtree(tmp, ignore_errors=True)


def _certqueue(report: RunReport, args: argparse.Namespace, auth: Authority) -> None:
    bind = auth.bind
    env = {
        "CERTQUEUE_CHALLENGES__DNS_PROVIDER": "rfc2136",
        "CERTQUEUE_CHALLENGES__RFC2136": json.dumps(
            bind.provider_config(propagation_timeout=30, polling_interval=0.3)
        ),
        "CERTQUEUE_CHALLENGES__DNS_RESOLVERS": json.dumps([bind.nameserver]),
        "CERTQUEUE_CHALLENGES__NAMESERVER_PORT": str(bind.port),
    }
    name = f"certqueue {args.cq_workers}x{args.cq_concurrency} + dns 1x4"
    cs = build_stack(extra_env=env, dns_server=bind.nameserver, http01=False, instrument=False, case=name)
    try:
        cs.start_workers("acme", args.cq_workers, args.cq_concurrency)
        cs.start_workers("dns", 1, 4)
        tag = secrets.token_hex(2)
        result = run_certqueue_timed(
            cs,
            name=name,
            group="dns-01",
            n=args.dns_n,
            domains_for=lambda i: [f"*.q{tag}{i}.example.test"],
            request_kw={"challenge_type": "dns-01"},
            warmup=2,
            timeout=args.case_timeout,
            stall=args.stall,
        )
        result.note = (
            f"wildcard, RFC2136 to BIND, propagation checked at the zone's NS ({bind.nameserver}), "
            "chord over the dns pool"
        )
        report.cases.append(result)
    finally:
        cs.teardown()


def _lego(n: int, parallel: int, auth: Authority, budget: float) -> CaseResult:
    bind = auth.bind
    label = "lego rfc2136 sequential" if parallel == 1 else f"lego rfc2136 {parallel} processes"
    result = CaseResult(name=label, group="dns-01", n=n)
    why = peers.ensure_lego()
    if why:
        result.status, result.note = "skipped", why
        return result
    tag = secrets.token_hex(2)
    env = {
        "RFC2136_NAMESERVER": bind.nameserver,
        "RFC2136_TSIG_KEY": bind.key_name,
        "RFC2136_TSIG_SECRET": bind.secret,
        "RFC2136_TSIG_ALGORITHM": "hmac-sha256.",
        "RFC2136_PROPAGATION_TIMEOUT": "60",
        "RFC2136_POLLING_INTERVAL": "1",
        "RFC2136_TTL": "60",
    }
    with (
        peers.peer_ca(webroot=False, dns_server=bind.nameserver, case=label) as ca,
        tempfile.TemporaryDirectory(prefix="certqueue-bench-lego-dns-") as d,
    ):
        chal = ["--dns", "rfc2136", "--dns.resolvers", bind.nameserver]
        if not auth.propagation_checked:
            chal.append("--dns.disable-cp")
        peers.warm_lego(
            ca,
            d,
            parallel,
            chal,
            "lego-dns",
            env,
            name_for=lambda k: f"*.w{tag}{k}.example.test",
            wrap=auth.wrap,
        )
        cmds = []
        for i in range(n):
            argv, e = peers._lego_cmd(ca, f"{d}/p{i % parallel}", f"*.l{tag}{i}.example.test", chal)
            cmds.append((auth.wrap(argv), {**e, **env}))
        peers._timed_runs(result, ca, cmds, parallel=parallel, per_run_timeout=120, budget=budget)
    if auth.propagation_checked:
        result.note = (
            f"--dns rfc2136, lego's own propagation check at the zone's NS ({bind.nameserver}); "
            "one account per process slot, registered before the clock"
        )
    else:
        result.note = (
            f"--dns rfc2136 --dns.disable-cp (no propagation check: {auth.why_not}); one account per slot"
        )
    result.extra["propagation_checked"] = auth.propagation_checked
    return result


def run_dns(report: RunReport, args: argparse.Namespace) -> None:
    with authority(zone="example.test") as auth:
        _certqueue(report, args, auth)
        report.cases.append(_lego(max(2, args.dns_n // 8), 1, auth, args.case_timeout))
        report.cases.append(_lego(args.dns_n, 8, auth, args.case_timeout))
