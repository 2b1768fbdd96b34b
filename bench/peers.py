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
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.diag import case_dir, copy_logs
from bench.env import start_pebble
from bench.procs import CpuMeter, stop_process, tree_cpu
from bench.report import CaseResult
from devstack.pebble import ChallTestSrv, PebbleServer
from devstack.ports import free_port

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "var" / "bench-peers"
CERTBOT = PEERS / "certbot" / "bin" / "certbot"
PYSPY = PEERS / "certbot" / "bin" / "py-spy"
LEGO = "/usr/bin/lego"
GNU_TIME = "/usr/bin/time"
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
    artifacts: Path | None = None

    def pebble_pids(self) -> list[int]:
        return [p.pid for p in (self.pebble.proc, self.dns.proc if self.dns else None) if p is not None]

    def webroot_pids(self) -> list[int]:
        return [self.webroot_proc.pid] if self.webroot_proc and self.webroot_proc.poll() is None else []

    def pebble_cpu(self) -> float:
        return tree_cpu([self.pebble.proc.pid]) if self.pebble.proc else 0.0

    def webroot_cpu(self) -> float:
        return tree_cpu([self.webroot_proc.pid]) if self.webroot_proc else 0.0


def _start_webroot(tmp: Path, attempts: int = 5) -> tuple[subprocess.Popen[bytes], int]:
    """:mod:`bench.webroot` on a free port, checked to be the process that bound it."""
    log_path = tmp / "webroot.log"
    for _ in range(attempts):
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.webroot", "--port", str(port), "--dir", str(tmp / "webroot")],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            if f"webroot on 127.0.0.1:{port}".encode() in log_path.read_bytes():
                return proc, port
            time.sleep(0.05)
        stop_process(proc)
    raise RuntimeError(f"the webroot server could not bind a port: {log_path.read_text()[-500:]}")


@contextmanager
def peer_ca(*, webroot: bool, dns_server: str | None = None, case: str = "peer") -> Iterator[PeerCA]:
    """A fresh Pebble (and its DNS), optionally a static file server on its HTTP port; the logs of
    Pebble, its DNS and the file server are kept in the case's artifacts when it ends."""
    tmp = Path(tempfile.mkdtemp(prefix="certqueue-bench-peer-"))
    (tmp / "webroot" / ".well-known" / "acme-challenge").mkdir(parents=True)
    # the file server binds first: on a shared machine a "free" port can be taken before it binds
    # (seen: every challenge of a certbot run then went to someone else's server)
    web_proc, http_port = _start_webroot(tmp) if webroot else (None, free_port())
    try:
        peb, dns = start_pebble(http_port, dns_server)
    except BaseException:
        stop_process(web_proc)
        raise
    ca = PeerCA(pebble=peb, dns=dns, http_port=http_port, webroot=tmp / "webroot", artifacts=case_dir(case))
    ca.webroot_proc = web_proc
    try:
        yield ca
    finally:
        stop_process(ca.webroot_proc)
        logs = [("pebble.log", peb.log_path if peb.workdir else None), ("webroot.log", tmp / "webroot.log")]
        if dns is not None and dns.workdir:
            logs.append(("challtestsrv.log", dns.workdir / "challtestsrv.log"))
        if ca.artifacts is not None:
            copy_logs(ca.artifacts, logs)
        peb.stop()
        if dns is not None:
            dns.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def run_measured(
    argv: list[str], env: dict[str, str], log_path: Path, timeout: float
) -> tuple[int | None, float, float, float]:
    """Run one command, output to ``log_path``: (exit code or None on timeout, wall s, CPU s, peak RSS MB).

    CPU comes from ``wait4`` on that child alone (its own rusage, its reaped children's included), so
    parallel runs do not mix their numbers. Peak RSS comes from GNU time's ``%M`` (the command runs
    under ``/usr/bin/time``): ``wait4``'s ``ru_maxrss`` would count the bench's own memory, which the
    forked child holds until it execs.
    """
    rss_file = log_path.with_suffix(f".{threading.get_ident()}.rss")
    if os.access(GNU_TIME, os.X_OK):
        argv = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv]
    s = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        p = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    timer = threading.Timer(timeout, lambda: _kill_group(p.pid))
    timer.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - s
    rc: int | None = p.returncode
    if rc is not None and rc < 0 and wall >= timeout:
        rc = None
    try:
        maxrss = int(rss_file.read_text().split()[-1]) / 1024
        rss_file.unlink()
    except (OSError, ValueError, IndexError):
        maxrss = 0.0
    return rc, wall, ru.ru_utime + ru.ru_stime, maxrss


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass


def _last_line(log_path: Path) -> str:
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "?"
    return lines[-1][:200] if lines else "?"


def _timed_runs(
    result: CaseResult,
    ca: PeerCA,
    commands: list[tuple[list[str], dict[str, str]]],
    parallel: int,
    per_run_timeout: float,
    budget: float,
) -> None:
    """Run the commands (``parallel`` at a time); fill ok, wall, latencies, CPU, RSS of ``result``.

    The clock starts when the first command is launched and stops when the last one exits: a peer
    run as a user runs it pays its interpreter start, so that is inside the window. Each command's
    output is kept in the case's artifacts (``logs/run-<i>.log``).
    """
    logs = (ca.artifacts or Path(tempfile.mkdtemp(prefix="certqueue-bench-peerlogs-"))) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    meter = CpuMeter({"pebble": ca.pebble_pids, "webroot": ca.webroot_pids})
    meter.start()
    result.loadavg_before = os.getloadavg()
    t0 = time.monotonic()
    deadline = t0 + budget
    errors: list[str] = []
    client_cpu: list[float] = []
    rss: list[float] = []
    lock = threading.Lock()

    def run(item: tuple[int, tuple[list[str], dict[str, str]]]) -> float | None:
        i, (argv, env) = item
        if time.monotonic() > deadline:
            return None
        log_path = logs / f"run-{i}.log"
        rc, wall, cpu, maxrss = run_measured(argv, env, log_path, per_run_timeout)
        with lock:
            client_cpu.append(cpu)
            rss.append(maxrss)
            if rc != 0:
                errors.append("timeout" if rc is None else _last_line(log_path))
        return wall if rc == 0 else None

    # slot k runs commands k, k + parallel, ... one after another (a slot is one config/account
    # folder: certbot locks its config dir, so two runs never share one at the same time)
    walls: list[float | None] = [None] * len(commands)

    def slot(k: int) -> None:
        for i in range(k, len(commands), parallel):
            walls[i] = run((i, commands[i]))

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(slot, range(parallel)))
    lat = [x for x in walls if x is not None]
    result.wall_s = time.monotonic() - t0
    result.loadavg_after = os.getloadavg()
    cpu = meter.stop()
    result.ok = len(lat)
    result.latencies_s = lat
    result.cpu_s = {"client": sum(client_cpu) + cpu.get("webroot", 0.0), "pebble": cpu.get("pebble", 0.0)}
    result.cpu_s["total"] = sum(result.cpu_s.values())
    result.client_cpu_s = result.cpu_s["client"]
    result.pebble_cpu_s = result.cpu_s["pebble"]
    result.peak_rss_mb = {"client": max(rss, default=0.0), **meter.peak_rss_mb}
    skipped = sum(1 for w in walls if w is None) - len(errors)
    if result.ok < result.n:
        result.status = "stalled" if skipped else "partial"
    if errors:
        result.extra["errors"] = errors[:5]
        result.extra["failed"] = len(errors)
    if skipped:
        result.extra["not_run_budget_exhausted"] = skipped
    if ca.artifacts is not None:
        result.extra["artifacts"] = str(ca.artifacts)


def _certbot_base(ca: PeerCA, d: str) -> list[str]:
    return [
        str(CERTBOT),
        "--server",
        ca.pebble.directory_url,
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
    ]


def _certbot_certonly(ca: PeerCA, d: str, name: str, *, webroot: bool) -> list[str]:
    if webroot:
        chal = ["--webroot", "-w", str(ca.webroot)]
    else:
        chal = ["--standalone", "--http-01-port", str(ca.http_port), "--http-01-address", "127.0.0.1"]
    return [
        *_certbot_base(ca, d),
        "certonly",
        *chal,
        "--preferred-challenges",
        "http",
        "-d",
        name,
        "--key-type",
        "ecdsa",
        "--elliptic-curve",
        "secp256r1",
        "--quiet",
    ]


def _register_certbot(ca: PeerCA, d: str, env: dict[str, str]) -> None:
    """Register the account before the clock starts (a fleet's certbot has one already)."""
    log_path = (ca.artifacts or Path(d)) / "register.log"
    for _ in range(5):  # certbot retries a badNonce once; Pebble rejects 5% of nonces
        rc, *_ = run_measured([*_certbot_base(ca, d), "register", "--quiet"], env, log_path, 90)
        if rc == 0:
            break
    if rc != 0:
        raise RuntimeError(f"certbot register failed: {_last_line(log_path)}")


def run_certbot(n: int, *, budget: float, prefix: str = "certbot", parallel: int = 1) -> CaseResult:
    """certbot once per certificate: sequentially with its standalone server, or ``parallel``
    processes at a time (each slot its own config dir and account, all on one webroot server)."""
    label = "certbot sequential" if parallel == 1 else f"certbot {parallel} parallel"
    result = CaseResult(name=label, group="http-01", n=n)
    why = ensure_certbot()
    if why:
        result.status, result.note = "skipped", why
        return result
    with (
        peer_ca(webroot=parallel > 1, case=label) as ca,
        tempfile.TemporaryDirectory(prefix="certqueue-bench-certbot-") as d,
    ):
        env = {"REQUESTS_CA_BUNDLE": str(ca.pebble.ca_bundle)}
        for k in range(parallel):
            _register_certbot(ca, f"{d}/p{k}", env)
        cmds = [
            (
                _certbot_certonly(
                    ca, f"{d}/p{i % parallel}", f"{prefix}-{i}.bench.test", webroot=parallel > 1
                ),
                env,
            )
            for i in range(n)
        ]
        _timed_runs(result, ca, cmds, parallel=parallel, per_run_timeout=90, budget=budget)
    result.note = (
        "one certbot process per certificate, "
        + ("standalone HTTP-01 server" if parallel == 1 else "webroot on one static server")
        + f"; {parallel} config dir(s), accounts registered before the clock"
    )
    return result


def run_certbot_renew(n: int, *, budget: float, prefix: str = "certbot-renew") -> CaseResult:
    """``certbot renew --force-renewal`` over ``n`` lineages in one process (how a fleet host renews);
    the lineages are issued first, outside the clock."""
    result = CaseResult(name=f"certbot renew {n} lineages", group="http-01", n=n)
    why = ensure_certbot()
    if why:
        result.status, result.note = "skipped", why
        return result
    with (
        peer_ca(webroot=True, case="certbot renew") as ca,
        tempfile.TemporaryDirectory(prefix="certqueue-bench-certbot-renew-") as d,
    ):
        env = {"REQUESTS_CA_BUNDLE": str(ca.pebble.ca_bundle)}
        _register_certbot(ca, d, env)
        setup = ca.artifacts / "setup.log" if ca.artifacts else Path(d) / "setup.log"
        made = 0
        for i in range(n):
            rc, *_ = run_measured(
                _certbot_certonly(ca, d, f"{prefix}-{i}.bench.test", webroot=True), env, setup, 90
            )
            made += rc == 0
        if made < n:
            result.status, result.note = "error", f"only {made}/{n} lineages could be issued first"
            return result
        # a non-interactive renew sleeps up to 8 min first (spreading load on the CA): not here
        cmd = [*_certbot_base(ca, d), "renew", "--force-renewal", "--no-random-sleep-on-renew", "--quiet"]
        _timed_runs(result, ca, [(cmd, env)], parallel=1, per_run_timeout=budget, budget=budget)
        renewed = len(list(Path(f"{d}/config/archive").glob("*/cert2.pem")))
        result.ok = renewed
        result.latencies_s = []
        result.status = "ok" if renewed == n else "partial"
    result.note = f"one certbot process renews {n} lineages (webroot); lineages issued before the clock"
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


def warm_lego(
    ca: PeerCA,
    d: str,
    parallel: int,
    chal: list[str],
    prefix: str,
    env: dict[str, str],
    name_for: Callable[[int], str] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> None:
    """One uncounted certificate per slot folder: lego registers its account on the first run, and a
    fleet's lego has its account already. ``name_for(k)`` names slot k's certificate (default
    ``<prefix>-warm<k>.bench.test``); ``wrap`` rewrites the command line as the timed runs do."""
    log_path = (ca.artifacts or Path(d)) / "register.log"

    def one(k: int) -> int | None:
        name = name_for(k) if name_for else f"{prefix}-warm{k}.bench.test"
        argv, e = _lego_cmd(ca, f"{d}/p{k}", name, chal)
        return run_measured(wrap(argv) if wrap else argv, {**e, **env}, log_path, 120)[0]

    with ThreadPoolExecutor(max_workers=min(parallel, 8)) as pool:
        rcs = list(pool.map(one, range(parallel)))
    if any(rc != 0 for rc in rcs):
        raise RuntimeError(f"lego account warm-up failed: {_last_line(log_path)}")


def run_lego(n: int, *, parallel: int, budget: float, prefix: str = "lego") -> CaseResult:
    label = "lego sequential" if parallel == 1 else f"lego {parallel} processes"
    result = CaseResult(name=label, group="http-01", n=n)
    why = ensure_lego()
    if why:
        result.status, result.note = "skipped", why
        return result
    with (
        peer_ca(webroot=parallel > 1, case=label) as ca,
        tempfile.TemporaryDirectory(prefix="certqueue-bench-lego-") as d,
    ):
        if parallel == 1:
            chal = ["--http", "--http.port", f"127.0.0.1:{ca.http_port}"]
        else:
            chal = ["--http", "--http.webroot", str(ca.webroot)]
        warm_lego(ca, d, parallel, chal, prefix, {})
        # one account folder per process slot (a user's lego keeps its account in --path)
        cmds = [_lego_cmd(ca, f"{d}/p{i % parallel}", f"{prefix}-{i}.bench.test", chal) for i in range(n)]
        _timed_runs(result, ca, cmds, parallel=parallel, per_run_timeout=120, budget=budget)
    result.note = (
        "standalone --http.port" if parallel == 1 else "--http.webroot, one static server"
    ) + "; one account per process slot, registered before the clock"
    return result


def run_bare(
    n: int, *, processes: int, threads: int, budget: float, prefix: str = "bare", poll: float = 0.05
) -> CaseResult:
    """The bare loop with a start barrier: every process registers its account and builds its
    clients, says ``ready``, and waits for a file; the clock starts when the harness creates it and
    stops at the last certificate any process finished (their ``finished_at``)."""
    name = f"bare acme {processes}x{threads}"
    result = CaseResult(name=name, group="http-01", n=n)
    with peer_ca(webroot=True, case=name) as ca:
        assert ca.artifacts is not None
        barrier = ca.artifacts / "barrier"
        per = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
        procs = []
        for i, k in enumerate(per):
            if not k:
                continue
            err = open(ca.artifacts / f"bare-{i}.log", "wb")
            procs.append(
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
                        "--barrier",
                        str(barrier),
                    ],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    start_new_session=True,
                )
            )
            err.close()
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                for q in procs:
                    stop_process(q)  # type: ignore[arg-type]
                raise RuntimeError(f"bare acme process did not get ready: {line!r}")
        meter = CpuMeter({"webroot": ca.webroot_pids, "pebble": ca.pebble_pids})
        meter.start()
        result.loadavg_before = os.getloadavg()
        t0 = time.time()
        barrier.touch()
        outs = []
        stalled = False
        for p in procs:
            try:
                out, _err = p.communicate(timeout=budget)
                outs.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else {})
            except (subprocess.TimeoutExpired, ValueError):
                stalled = True
                stop_process(p)  # type: ignore[arg-type]
        result.loadavg_after = os.getloadavg()
        cpu = meter.stop()
    result.ok = sum(o.get("ok", 0) for o in outs)
    result.latencies_s = [x for o in outs for x in o.get("latencies", [])]
    finished = [o["finished_at"] for o in outs if o.get("finished_at")]
    result.wall_s = max(finished) - t0 if finished else None
    # the processes' own CPU after the barrier (rusage inside them) + the webroot server
    own = sum(o.get("cpu", 0) for o in outs)
    result.cpu_s = {"client": own + cpu.get("webroot", 0.0), "pebble": cpu.get("pebble", 0.0)}
    result.cpu_s["total"] = sum(result.cpu_s.values())
    result.client_cpu_s = result.cpu_s["client"]
    result.pebble_cpu_s = result.cpu_s["pebble"]
    result.peak_rss_mb = {"client": max((o.get("maxrss_mb", 0.0) for o in outs), default=0.0)}
    failed = sum(o.get("failed", 0) for o in outs)
    if failed:
        result.extra["failed"] = failed
        result.extra["errors"] = [e for o in outs for e in o.get("errors", [])][:5]
    result.status = "stalled" if stalled else ("ok" if result.ok == n else "partial")
    result.note = f"poll {poll}s; start barrier after account registration; wall from barrier to last cert"
    result.extra["artifacts"] = str(ca.artifacts)
    return result
