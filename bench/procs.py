"""Process helpers for the benchmarks: CPU and peak memory from ``/proc``, a private Redis, a fresh
PostgreSQL database, and a bounded wait.

CPU of a long-running process tree (certqueue's workers, the responder, Pebble) is read from
``/proc/<pid>/stat`` (utime + stime of every live process in the tree plus what its reaped children
used); CPU of short-lived peers (certbot, lego, bare-acme runs) is ``RUSAGE_CHILDREN`` of this process.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from devstack.ports import free_port, wait_tcp

CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_ADMIN = os.environ.get("CERTQUEUE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces: split after the closing parenthesis
    return raw[raw.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live descendant (via /proc/<pid>/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else []:
            try:
                todo += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def tree_cpu(pids: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by the trees rooted at ``pids``."""
    ticks = 0
    seen: set[int] = set()
    for root in pids:
        for p in descendants(root):
            if p in seen:
                continue
            seen.add(p)
            f = _stat_fields(p)
            if f is None:
                continue
            # fields after ")": state=0 ... utime=11 stime=12 cutime=13 cstime=14
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of one process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes; True when it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)


@dataclass
class RedisServer:
    """A private ``redis-server`` on a free loopback port, no persistence (the bench never shares
    another engineer's Redis databases)."""

    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (scripts/services install)")
        self.port = self.port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="certqueue-bench-redis-"))
        argv = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "yes",
        ]
        with open(self.workdir / "redis.log", "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        wait_tcp("127.0.0.1", self.port, timeout=10)
        return self

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "redis.log" if self.workdir else None

    def cpu(self) -> float:
        return tree_cpu([self.proc.pid]) if self.proc else 0.0

    def rss_mb(self) -> float | None:
        return vm_hwm_mb(self.proc.pid) if self.proc else None

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


PG_BIN = Path("/usr/lib/postgresql")


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster (``initdb`` + ``postgres``) on a free loopback port, Debian's
    defaults except ``max_connections``; run as the ``postgres`` user when we are root. Started by
    ``--private-postgres`` so a case neither competes with other engineers' tests for the shared
    server's 100 connections nor takes them away (seen: a 10,000 storm holding 64 of them while other
    test suites ran; the http01 responder then got "too many clients" and orders went invalid)."""

    max_connections: int = 300
    port: int = 0
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _bin(self, name: str) -> str:
        versions = sorted(PG_BIN.glob("*/bin/" + name), key=lambda p: int(p.parts[-3]))
        if not versions:
            raise RuntimeError(f"{name} not found under {PG_BIN} (apt-get install postgresql)")
        return str(versions[-1])

    def start(self) -> PostgresServer:
        as_user: list[str] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="certqueue-bench-pg-"))
        data = self.workdir / "data"
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
            as_user = ["runuser", "-u", "postgres", "--"]
        log_path = self.workdir / "postgres.log"
        subprocess.run(
            [*as_user, self._bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.port = self.port or free_port()
        argv = [
            *as_user,
            self._bin("postgres"),
            "-D",
            str(data),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.workdir}",
            "-c",
            f"max_connections={self.max_connections}",
        ]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        wait_tcp("127.0.0.1", self.port, timeout=30)
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.admin_url, connect_timeout=2):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"private postgres did not start: {log_path.read_text()[-1000:]}"
                    ) from None
                time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def create_database(prefix: str = "cq_bench") -> tuple[str, Callable[[], None]]:
    """A new PostgreSQL database on the dev server: (SQLAlchemy URL, drop function)."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        from certqueue.db import dispose_all

        dispose_all()
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"postgresql+psycopg://{urlsplit(PG_ADMIN).netloc}/{name}", drop


def pg_stat(url: str) -> dict[str, int]:
    """Counters of the database behind ``url`` from pg_stat_database (transactions, tuples, blocks)."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    name = dsn.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated,"
            " tup_deleted, blks_hit, blks_read FROM pg_stat_database WHERE datname = %s",
            (name,),
        ).fetchone()
    keys = [
        "xact_commit",
        "xact_rollback",
        "tup_returned",
        "tup_fetched",
        "tup_inserted",
        "tup_updated",
        "tup_deleted",
        "blks_hit",
        "blks_read",
    ]
    return dict(zip(keys, [int(v) for v in row], strict=True)) if row else {}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def postgres_backend_cpu(url: str) -> float:
    """CPU seconds used so far by the PostgreSQL backends currently connected to ``url``'s database
    (the pooled connections of certqueue's processes live for the whole case)."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        pids = [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)
            ).fetchall()
        ]
    return tree_cpu(pids)


def backend_pids(url: str) -> list[int]:
    """PIDs of the PostgreSQL backends connected to ``url``'s database now."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        return [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)
            ).fetchall()
        ]


class CpuMeter:
    """CPU seconds and peak RSS per named group of process trees, over a measured window.

    ``groups`` maps a column name ("certqueue", "postgresql", "redis", "pebble", ...) to a function
    returning the root pids of that group now (PostgreSQL backends come and go, so roots are looked up
    at every sample). A sampling thread (every ``interval`` s) keeps, per root, the first and the last
    cumulative CPU it saw (live tree + reaped children); a root first seen during the window starts at
    zero. What a root spent between its last sample and its exit is lost (at most one interval).
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]], interval: float = 1.0) -> None:
        import threading

        self.groups = groups
        self.interval = interval
        self._first: dict[tuple[str, int], float] = {}
        self._last: dict[tuple[str, int], float] = {}
        self._rss: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    def _sample(self) -> None:
        for name, roots in self.groups.items():
            try:
                pids = roots()
            except Exception:
                continue
            for root in pids:
                key = (name, root)
                cpu = tree_cpu([root])
                if key not in self._first:
                    self._first[key] = cpu if not self._started else 0.0
                self._last[key] = cpu
                for p in descendants(root):
                    m = vm_hwm_mb(p)
                    if m is not None:
                        self._rss[name] = max(self._rss.get(name, 0.0), m)

    def start(self) -> None:
        import threading

        self._sample()
        self._started = True

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self._sample()

        self._thread = threading.Thread(target=loop, daemon=True, name="bench-cpu-meter")
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group over the window (and the sum under ``total``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sample()
        out: dict[str, float] = {name: 0.0 for name in self.groups}
        for (name, root), last in self._last.items():
            out[name] += max(0.0, last - self._first.get((name, root), 0.0))
        out["total"] = sum(v for k, v in out.items() if not k.startswith("client:"))
        return out

    @property
    def peak_rss_mb(self) -> dict[str, float]:
        return dict(self._rss)


def SystemMeter(cs: Any) -> CpuMeter:
    """A :class:`CpuMeter` over a whole certqueue stack: its processes, PostgreSQL, Redis, Pebble."""
    groups: dict[str, Callable[[], list[int]]] = {
        "client": lambda: [p.pid for p in cs.stack.procs.values() if p.poll() is None],
        "postgresql": lambda: backend_pids(cs.db_url),
        "redis": lambda: [cs.redis.proc.pid] if cs.redis.proc else [],
        "pebble": lambda: [cs.pebble.proc.pid] if cs.pebble.proc else [],
    }
    if cs.dns is not None:
        groups["pebble"] = lambda: [
            p for p in (cs.pebble.proc, cs.dns.proc) if p is not None for p in [p.pid]
        ]
    if getattr(cs, "proxy", None) is not None:
        groups["counting proxy (bench)"] = lambda: [cs.proxy.proc.pid]
    # the client's share per process of the stack ("client:acme-1", "client:scan", ...): a detail
    # of "client", left out of the total
    for pname in list(cs.stack.procs):
        groups[f"client:{pname}"] = lambda pname=pname: [
            p.pid for n, p in cs.stack.procs.items() if n == pname and p.poll() is None
        ]
    return CpuMeter(groups)
