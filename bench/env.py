"""The certqueue stack for a benchmark case, without pytest: Pebble (+ pebble-challtestsrv, or BIND
as its DNS), a private Redis, a fresh PostgreSQL database, the http01 responder and worker pools as
real subprocesses (``python -m certqueue worker --pool acme -c N``).

With ``instrument=True`` the workers get ``bench/instrument`` on ``PYTHONPATH``: its
``sitecustomize`` counts SQL statements and ACME HTTP calls (count and time) per Celery task name and
writes them to ``<workdir>/instrument/<pid>.json``; certqueue itself is untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.diag import case_dir
from bench.procs import RedisServer, create_database, stop_process, tree_cpu
from certqueue import certificates
from certqueue.celery_app import lazy_app
from certqueue.config import load_settings, set_settings
from certqueue.db import dispose_all
from certqueue.keystore import generate_key_file
from devstack.pebble import ChallTestSrv, PebbleServer
from devstack.ports import free_port
from devstack.stack import Stack

INSTRUMENT_DIR = Path(__file__).resolve().parent / "instrument"

#: ``CERTQUEUE_*`` overrides for every certqueue stack of the run (``--cq-env KEY=VALUE``)
EXTRA_ENV: dict[str, str] = {}


@dataclass
class CountingProxyProcess:
    """:mod:`tests.fakes.acme_counting_proxy` as its own process in front of one Pebble."""

    proc: subprocess.Popen[bytes]
    directory_url: str
    ca_bundle: Path
    log_path: Path

    @property
    def counts_url(self) -> str:
        return self.directory_url.rsplit("/", 1)[0] + "/counts"

    def counts(self) -> dict[str, int]:
        import requests

        resp = requests.get(self.counts_url, verify=str(self.ca_bundle), timeout=10)
        resp.raise_for_status()
        data: dict[str, int] = resp.json()
        return data

    def cpu(self) -> float:
        return tree_cpu([self.proc.pid])

    def stop(self) -> None:
        stop_process(self.proc)


def start_counting_proxy(peb: PebbleServer, workdir: Path, *, guard: bool = False) -> CountingProxyProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "counting-proxy.log"
    root = Path(__file__).resolve().parent.parent
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fakes.acme_counting_proxy",
                "--upstream",
                peb.directory_url,
                "--ca",
                str(peb.ca_bundle),
                "--workdir",
                str(workdir),
                *(["--guard-pebble-deadlock"] if guard else []),
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("counting proxy ready "):
                _, _, _, url, bundle = line.split()
                return CountingProxyProcess(proc, url, Path(bundle), log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError(f"counting proxy did not start: {log_path.read_text(errors='replace')[-2000:]}")


def start_pebble(
    http_port: int, dns_server: str | None = None, env: dict[str, str] | None = None
) -> tuple[PebbleServer, ChallTestSrv | None]:
    """A fresh Pebble (NOSLEEP, no authz reuse); with pebble-challtestsrv as its DNS unless given one."""
    dns = None
    if dns_server is None:
        dns = ChallTestSrv().start()
        dns_server = dns.dns_address
    try:
        peb = PebbleServer(http_port=http_port, dns_server=dns_server, env=env or {}).start()
    except BaseException:
        if dns is not None:
            dns.stop()
        raise
    return peb, dns


@dataclass
class CertqueueStack:
    workdir: Path
    pebble: PebbleServer
    dns: ChallTestSrv | None
    redis: RedisServer
    db_url: str
    env: dict[str, str]
    stack: Stack
    http_port: int
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    #: where this case keeps its processes' logs (:mod:`bench.diag`); filled at teardown
    artifacts: Path | None = None
    proxy: CountingProxyProcess | None = None

    @property
    def directory_url(self) -> str:
        """The directory certqueue talks to (the counting proxy's when there is one)."""
        return self.proxy.directory_url if self.proxy else self.pebble.directory_url

    @property
    def instrument_dir(self) -> Path:
        return self.workdir / "instrument"

    def install_settings(self) -> None:
        """Make this process talk to the same database, broker and key file as the workers."""
        set_settings(load_settings(environ=self.env, directory=self.workdir / "settings").settings)
        dispose_all()
        certificates.forget_keystores()
        lazy_app.reset()

    def start_workers(self, pool: str, processes: int, concurrency: int) -> list[str]:
        names = []
        for i in range(processes):
            name = f"bench-{pool}-{i}"
            self.stack.start_worker(pool, concurrency=concurrency, name=name)
            names.append(name)
        self.workers += names
        return names

    def worker_pids(self) -> list[int]:
        return [self.stack.procs[n].pid for n in self.workers if n in self.stack.procs]

    def client_pids(self) -> list[int]:
        """Every certqueue process whose CPU counts as the client's: workers and the responder."""
        pids = self.worker_pids()
        if "http01" in self.stack.procs:
            pids.append(self.stack.procs["http01"].pid)
        return pids

    def client_cpu(self) -> float:
        return tree_cpu(self.client_pids())

    def pebble_cpu(self) -> float:
        return tree_cpu([self.pebble.proc.pid]) if self.pebble.proc else 0.0

    def stop_workers(self) -> None:
        for n in self.workers:
            self.stack.stop(n, timeout=30)

    def log_files(self) -> list[tuple[str, Path | None]]:
        """(name, path) of the log of every process this stack started."""
        files: list[tuple[str, Path | None]] = sorted(
            (p.name, p) for p in (self.workdir / "logs").glob("*.log")
        )
        if self.pebble.workdir:
            files.append(("pebble.log", self.pebble.log_path))
        if self.dns is not None and self.dns.workdir:
            files.append(("challtestsrv.log", self.dns.workdir / "challtestsrv.log"))
        files.append(("redis.log", self.redis.log_path))
        if self.proxy is not None:
            files.append(("counting-proxy.log", self.proxy.log_path))
        return files

    def keep_logs(self) -> None:
        if self.artifacts is not None:
            from bench.diag import copy_logs

            copy_logs(self.artifacts, self.log_files())
            # BENCH_YAPPI=1: the pool processes' CPU profiles (bench/instrument)
            profiles = (
                sorted(self.instrument_dir.glob("yappi-*.pstat")) if self.instrument_dir.exists() else []
            )
            if profiles:
                import shutil

                self.artifacts.mkdir(parents=True, exist_ok=True)
                for p in profiles:
                    shutil.copy2(p, self.artifacts / p.name)

    def teardown(self) -> None:
        try:
            self.stop_workers()
        except Exception:
            pass
        self.keep_logs()
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:
                pass
        set_settings(None)
        dispose_all()
        lazy_app.reset()


def build_stack(
    *,
    extra_env: dict[str, str] | None = None,
    dns_server: str | None = None,
    instrument: bool = False,
    http01: bool = True,
    poll_initial: float = 0.05,
    poll_max: float = 1.0,
    case: str = "certqueue",
    pebble_env: dict[str, str] | None = None,
    counting_proxy: bool = False,
    guard_pebble_deadlock: bool = False,
    shipped: bool = False,
    backend: str = "postgres",
) -> CertqueueStack:
    """Everything but the workers (start them with :meth:`CertqueueStack.start_workers`)."""
    cleanups: list[Callable[[], None]] = []
    workdir = Path(tempfile.mkdtemp(prefix="certqueue-bench-"))
    try:
        (workdir / "settings").mkdir()
        key = workdir / "master.key"
        generate_key_file(key)
        http_port = free_port()
        peb, dns = start_pebble(http_port, dns_server, pebble_env)
        cleanups.append(peb.stop)
        if dns is not None:
            cleanups.append(dns.stop)
        proxy = (
            start_counting_proxy(peb, workdir / "proxy", guard=guard_pebble_deadlock)
            if counting_proxy
            else None
        )
        if proxy is not None:
            cleanups.append(proxy.stop)
        # the embedded default uses neither: the Redis is started anyway (idle, so the stack has one
        # shape) and the database is a SQLite file in the work folder
        redis = RedisServer().start()
        cleanups.append(redis.stop)
        if backend == "sqlite":
            db_url = f"sqlite:///{workdir / 'var' / 'certqueue.db'}"
            (workdir / "var").mkdir()
        else:
            db_url, drop = create_database()
            cleanups.append(drop)
        env = {
            "CERTQUEUE_SETTINGS_DIR": str(workdir / "settings"),
            "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(key),
            "CERTQUEUE_ACME__DIRECTORY_URL": proxy.directory_url if proxy else peb.directory_url,
            "CERTQUEUE_ACME__CA_BUNDLE": str(proxy.ca_bundle if proxy else peb.ca_bundle),
            "CERTQUEUE_ACME__EMAIL": "bench@example.test",
            "CERTQUEUE_CHALLENGES__HTTP_PORT": str(http_port),
            "CERTQUEUE_CHALLENGES__HTTP_HOST": "127.0.0.1",
            "CERTQUEUE_LOGGING__LEVEL": "INFO",
            "CERTQUEUE_DATABASE__URL": db_url,
        }
        if backend == "sqlite":
            env["CERTQUEUE_BROKER__FILESYSTEM_PATH"] = str(workdir / "var" / "broker")
        else:
            env["CERTQUEUE_BROKER__URL"] = redis.url
        if not shipped:
            env["CERTQUEUE_AUTOMATION__POLL_INITIAL_SECONDS"] = str(poll_initial)
            env["CERTQUEUE_AUTOMATION__POLL_MAX_SECONDS"] = str(poll_max)
            # Pebble enforces no rate limits; certqueue's fleet budgets are Let's Encrypt's (50
            # certificates per registered domain per week, 300 new orders per account per 3 h), which
            # would cap every case at 50 certificates under bench.test
            env["CERTQUEUE_RATE_LIMITS__ENABLED"] = "false"
        if instrument:
            (workdir / "instrument").mkdir()
            env["BENCH_INSTRUMENT_DIR"] = str(workdir / "instrument")
            env["PYTHONPATH"] = os.pathsep.join(
                [str(INSTRUMENT_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        env.update(EXTRA_ENV)
        env.update(extra_env or {})
        stack = Stack(workdir=workdir, env=env)
        cleanups.append(stack.stop_all)
        cs = CertqueueStack(
            workdir=workdir,
            pebble=peb,
            dns=dns,
            redis=redis,
            db_url=db_url,
            env=env,
            stack=stack,
            http_port=http_port,
            cleanups=cleanups,
            artifacts=case_dir(case),
            proxy=proxy,
        )
        stack.cli("db", "upgrade")
        cs.install_settings()
        if http01:
            stack.start_http01(http_port)
        return cs
    except BaseException:
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception:
                pass
        raise


def read_instrument(directory: Path) -> dict[str, dict[str, Any]]:
    """Merge the per-process counters written by ``bench/instrument/sitecustomize.py``."""
    merged: dict[str, dict[str, Any]] = {}
    for f in directory.glob("*.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for task, c in data.items():
            m = merged.setdefault(task, {})
            for k, v in c.items():
                m[k] = m.get(k, 0) + v
    return merged
