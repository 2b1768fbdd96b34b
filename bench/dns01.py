"""DNS-01 throughput for wildcard certificates through BIND9 (RFC 2136, TSIG), certqueue against
lego's ``rfc2136`` provider. One BIND serves both; each client gets a fresh Pebble resolving through
that BIND (``-dnsserver``), so Pebble validates the TXT records for real.

certqueue: ``challenges.dns_provider=rfc2136`` with the server's TSIG key, its propagation check
against BIND (``nameserver_port``), real ``acme`` and ``dns`` worker pools. lego: ``--dns rfc2136``
with ``--dns.resolvers`` at BIND and ``--dns.disable-cp`` (lego would ask the zone's NS on port 53,
which a loopback BIND on a high port is not: it skips the propagation check that certqueue does).
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile

from bench import peers
from bench.cq_issue import run_certqueue_timed
from bench.env import build_stack
from bench.report import CaseResult, RunReport
from certqueue.devstack.bind import BindServer


def _certqueue(report: RunReport, args: argparse.Namespace, bind: BindServer) -> None:
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
        result.note = "wildcard, RFC2136 to BIND, propagation checked at BIND, chord over the dns pool"
        report.cases.append(result)
    finally:
        cs.teardown()


def _lego(n: int, parallel: int, bind: BindServer, budget: float) -> CaseResult:
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
        chal = ["--dns", "rfc2136", "--dns.resolvers", bind.nameserver, "--dns.disable-cp"]
        cmds = []
        for i in range(n):
            argv, e = peers._lego_cmd(ca, f"{d}/p{i % parallel}", f"*.l{tag}{i}.example.test", chal)
            cmds.append((argv, {**e, **env}))
        peers._timed_runs(result, ca, cmds, parallel=parallel, per_run_timeout=120, budget=budget)
    result.note = "--dns rfc2136 --dns.disable-cp (no propagation check), one account per process slot"
    return result


def run_dns(report: RunReport, args: argparse.Namespace) -> None:
    with BindServer(zone="example.test") as bind:
        _certqueue(report, args, bind)
        report.cases.append(_lego(max(2, args.dns_n // 8), 1, bind, args.case_timeout))
        report.cases.append(_lego(args.dns_n, 8, bind, args.case_timeout))
