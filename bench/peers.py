"""The tools a user would pick instead of certqueue, run against a fresh Pebble each:

* certbot (PyPI, installed by :func:`ensure_certbot` into ``var/bench-peers/certbot``, never into
  the project's venv), once per certificate, sequentially, with its standalone HTTP-01 server on
  Pebble's HTTP port;
* lego (Debian ``lego``, installed by :func:`ensure_lego` with apt-get), once per certificate,
  sequentially (``--http --http.port``) and with 8 processes in parallel (``--http.webroot`` with one
  static server, :mod:`bench.webroot`);
* the bare ``acme`` library (:mod:`bench.bare_acme`) with P processes of T threads.

Every run has a timeout; a run that times out counts as failed, and a case that cannot finish in its
budget is reported ``stalled`` instead of hanging.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.env import start_pebble
from bench.procs import children_cpu, stop_process, tree_cpu
from bench.report import CaseResult
from certqueue.devstack.pebble import ChallTestSrv, PebbleServer
from certqueue.devstack.ports import free_port, wait_tcp

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "var" / "bench-peers"
CERTBOT = PEERS / "certbot" / "bin" / "certbot"
PYSPY = PEERS / "certbot" / "bin" / "py-spy"
LEGO = "/usr/bin/lego"
EMAIL = "bench@example.test"


def ensure_certbot() -> str | None:
    """Install certbot (and py-spy, for profiles) into their own venv; None when it is there."""
    if CERTBOT.exists():
        return None
    PEERS.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(PEERS / "certbot")],
            check=True,
            timeout=120,
            capture_output=True,
        )
        subprocess.run(
            [str(PEERS / "certbot" / "bin" / "pip"), "install", "-q", "certbot", "py-spy"],
            check=True,
            timeout=600,
            capture_output=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return f"certbot install failed: {type(exc).__name__}"
    return None


def ensure_lego() -> str | None:
    if os.access(LEGO, os.X_OK):
        return None
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "lego"],
            check=True,
            timeout=600,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return f"lego install failed (apt-get install lego): {type(exc).__name__}"
    return None


@dataclass
class PeerCA:
    pebble: PebbleServer
    dns: ChallTestSrv | None
    http_port: int
    webroot: Path
    webroot_proc: subprocess.Popen[bytes] | None = None

    def pebble_cpu(self) -> float:
        return tree_cpu([self.pebble.proc.pid]) if self.pebble.proc else 0.0

    def webroot_cpu(self) -> float:
        return tree_cpu([self.webroot_proc.pid]) if self.webroot_proc else 0.0


@contextmanager
def peer_ca(*, webroot: bool, dns_server: str | None = None) -> Iterator[PeerCA]:
    """A fresh Pebble (and its DNS), optionally a static file server on its HTTP port."""
    http_port = free_port()
    peb, dns = start_pebble(http_port, dns_server)
    tmp = Path(tempfile.mkdtemp(prefix="certqueue-bench-peer-"))
    ca = PeerCA(pebble=peb, dns=dns, http_port=http_port, webroot=tmp / "webroot")
    (ca.webroot / ".well-known" / "acme-challenge").mkdir(parents=True)
    try:
        if webroot:
            ca.webroot_proc = subprocess.Popen(
                [sys.executable, "-m", "bench.webroot", "--port", str(http_port), "--dir", str(ca.webroot)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            wait_tcp("127.0.0.1", http_port, timeout=15)
        yield ca
    finally:
        stop_process(ca.webroot_proc)
        peb.stop()
        if dns is not None:
            dns.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _timed_runs(
    result: CaseResult,
    ca: PeerCA,
    commands: list[tuple[list[str], dict[str, str]]],
    parallel: int,
    per_run_timeout: float,
    budget: float,
) -> None:
    """Run the commands (``parallel`` at a time); fill ok, wall, latencies, CPU of ``result``."""
    cpu0, peb0, web0 = children_cpu(), ca.pebble_cpu(), ca.webroot_cpu()
    t0 = time.monotonic()
    deadline = t0 + budget
    errors: list[str] = []

    def run(cmd: tuple[list[str], dict[str, str]]) -> float | None:
        argv, env = cmd
        if time.monotonic() > deadline:
            return None
        s = time.monotonic()
        try:
            p = subprocess.run(
                argv,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=per_run_timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            errors.append("timeout")
            return None
        if p.returncode != 0:
            errors.append(
                (p.stderr or p.stdout).strip().splitlines()[-1][:200]
                if (p.stderr or p.stdout)
                else f"exit {p.returncode}"
            )
            return None
        return time.monotonic() - s

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        lat = [x for x in pool.map(run, commands) if x is not None]
    result.wall_s = time.monotonic() - t0
    result.ok = len(lat)
    result.latencies_s = lat
    result.client_cpu_s = (children_cpu() - cpu0) + (ca.webroot_cpu() - web0)
    result.pebble_cpu_s = ca.pebble_cpu() - peb0
    skipped = len(commands) - len(lat) - len(errors)
    if result.ok < result.n:
        result.status = "stalled" if skipped else "partial"
    if errors:
        result.extra["errors"] = errors[:5]
        result.extra["failed"] = len(errors)
    if skipped:
        result.extra["not_run_budget_exhausted"] = skipped


def run_certbot(n: int, *, budget: float, prefix: str = "certbot") -> CaseResult:
    result = CaseResult(name="certbot sequential", group="http-01", n=n)
    why = ensure_certbot()
    if why:
        result.status, result.note = "skipped", why
        return result
    with peer_ca(webroot=False) as ca, tempfile.TemporaryDirectory(prefix="certqueue-bench-certbot-") as d:
        env = {"REQUESTS_CA_BUNDLE": str(ca.pebble.ca_bundle)}
        cmds = [
            (
                [
                    str(CERTBOT),
                    "certonly",
                    "--standalone",
                    "--preferred-challenges",
                    "http",
                    "--http-01-port",
                    str(ca.http_port),
                    "--http-01-address",
                    "127.0.0.1",
                    "--server",
                    ca.pebble.directory_url,
                    "-d",
                    f"{prefix}-{i}.bench.test",
                    "--non-interactive",
                    "--agree-tos",
                    "-m",
                    EMAIL,
                    "--no-eff-email",
                    "--config-dir",
                    f"{d}/config",
                    "--work-dir",
                    f"{d}/work",
                    "--logs-dir",
                    f"{d}/logs",
                    "--key-type",
                    "ecdsa",
                    "--elliptic-curve",
                    "secp256r1",
                    "--quiet",
                ],
                env,
            )
            for i in range(n)
        ]
        _timed_runs(result, ca, cmds, parallel=1, per_run_timeout=90, budget=budget)
    result.note = "one certbot process per certificate, one account (shared config dir)"
    return result


def _lego_cmd(ca: PeerCA, path: str, name: str, challenge: list[str]) -> tuple[list[str], dict[str, str]]:
    return (
        [
            LEGO,
            "--server",
            ca.pebble.directory_url,
            "--email",
            EMAIL,
            "--accept-tos",
            "--path",
            path,
            "--key-type",
            "ec256",
            "--domains",
            name,
            *challenge,
            "run",
        ],
        {"LEGO_CA_CERTIFICATES": str(ca.pebble.ca_bundle)},
    )


def run_lego(n: int, *, parallel: int, budget: float, prefix: str = "lego") -> CaseResult:
    label = "lego sequential" if parallel == 1 else f"lego {parallel} processes"
    result = CaseResult(name=label, group="http-01", n=n)
    why = ensure_lego()
    if why:
        result.status, result.note = "skipped", why
        return result
    with (
        peer_ca(webroot=parallel > 1) as ca,
        tempfile.TemporaryDirectory(prefix="certqueue-bench-lego-") as d,
    ):
        if parallel == 1:
            chal = ["--http", "--http.port", f"127.0.0.1:{ca.http_port}"]
        else:
            chal = ["--http", "--http.webroot", str(ca.webroot)]
        # one account folder per process slot (a user's lego keeps its account in --path)
        cmds = [_lego_cmd(ca, f"{d}/p{i % parallel}", f"{prefix}-{i}.bench.test", chal) for i in range(n)]
        _timed_runs(result, ca, cmds, parallel=parallel, per_run_timeout=120, budget=budget)
    result.note = (
        "standalone --http.port" if parallel == 1 else "--http.webroot, one static server"
    ) + "; one account per process slot"
    return result


def run_bare(
    n: int, *, processes: int, threads: int, budget: float, prefix: str = "bare", poll: float = 0.05
) -> CaseResult:
    result = CaseResult(name=f"bare acme {processes}x{threads}", group="http-01", n=n)
    with peer_ca(webroot=True) as ca:
        per = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
        peb0, web0 = ca.pebble_cpu(), ca.webroot_cpu()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.bare_acme",
                    "--directory",
                    ca.pebble.directory_url,
                    "--ca",
                    str(ca.pebble.ca_bundle),
                    "--webroot",
                    str(ca.webroot),
                    "--n",
                    str(k),
                    "--threads",
                    str(threads),
                    "--prefix",
                    f"{prefix}{i}",
                    "--poll",
                    str(poll),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for i, k in enumerate(per)
            if k
        ]
        outs = []
        stalled = False
        for p in procs:
            try:
                out, _err = p.communicate(timeout=budget)
                outs.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else {})
            except (subprocess.TimeoutExpired, ValueError):
                stalled = True
                stop_process(p)  # type: ignore[arg-type]
        result.pebble_cpu_s = ca.pebble_cpu() - peb0
        web = ca.webroot_cpu() - web0
    result.ok = sum(o.get("ok", 0) for o in outs)
    result.latencies_s = [x for o in outs for x in o.get("latencies", [])]
    result.wall_s = max((o.get("wall", 0) for o in outs), default=None)
    result.client_cpu_s = sum(o.get("cpu", 0) for o in outs) + web
    failed = sum(o.get("failed", 0) for o in outs)
    if failed:
        result.extra["failed"] = failed
        result.extra["errors"] = [e for o in outs for e in o.get("errors", [])][:5]
    result.status = "stalled" if stalled else ("ok" if result.ok == n else "partial")
    result.note = f"poll {poll}s; wall and CPU measured inside the processes (no interpreter start)"
    return result
