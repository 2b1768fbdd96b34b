"""Starting worker pools and beat (the ``workers/`` and ``beat/`` entry points call these), and the
supervisor that restarts them: beat always, a worker on the embedded default.

Per-pool settings: the queues each pool consumes, concurrency, pool type, prefetch. The acme pool
also consumes ``scan`` (beat's periodic tasks are light) and ``events`` (deliveries to
subscribers); the propagate pool consumes only the queues of the regions it is started for, so a
region's credentials exist only where it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certqueue.celery_app import lazy_app, region_queue
from certqueue.config import get_settings
from certqueue.errors import ConfigError
from certqueue.lifecycle.backoff import backoff

log = logging.getLogger("certqueue.workers")


@dataclass(frozen=True)
class PoolSpec:
    queues: tuple[str, ...]
    concurrency: int
    pool: str = "prefork"


def pool_spec(pool: str, regions: list[str]) -> PoolSpec:
    s = get_settings()
    b = s.broker
    if pool == "acme":
        return PoolSpec(("acme", "scan", "events"), b.acme_concurrency)
    if pool == "dns":
        return PoolSpec(("dns",), b.dns_concurrency)
    if pool == "propagate":
        if not regions:
            raise ConfigError("the propagate pool needs --region (one or more, or all)", key="--region")
        if regions == ["all"]:  # every configured region (compose: regions are defined once)
            regions = [r.name for r in s.multi_region.regions]
            if not regions:
                raise ConfigError("--region all: multi_region.regions is empty", key="multi_region.regions")
        for r in regions:
            s.region(r)
        return PoolSpec(tuple(region_queue(r) for r in regions), b.propagate_concurrency)
    if pool == "all":  # the embedded default: one process tree serves everything
        qs = ["acme", "scan", "dns", "events"] + [region_queue(r.name) for r in s.multi_region.regions]
        return PoolSpec(tuple(qs), max(b.acme_concurrency, 2))
    raise ConfigError(f"unknown pool {pool!r}", key="--pool")


#: set in the environment of a supervised child: run the process itself, not another supervisor
WORKER_CHILD_ENV = "CERTQUEUE_WORKER_CHILD"
BEAT_CHILD_ENV = "CERTQUEUE_BEAT_CHILD"
#: a child that ran this long before exiting counts as healthy: the backoff starts again
HEALTHY_RUN_SECONDS = 60.0


def run_worker(
    pool: str,
    regions: list[str],
    *,
    concurrency: int | None = None,
    loglevel: str | None = None,
    hostname: str | None = None,
) -> None:
    """A worker pool, under ``supervise`` (as beat is): a worker that dies is started again with
    backoff. On the embedded default nothing else would restart it; with Redis, kombu can take the
    whole worker down on a broker restart (an ack on the lost connection: "Unrecoverable error:
    AttributeError ... hostname"), and the queue would stay unserved until the process manager
    noticed."""
    spec = pool_spec(pool, regions)  # bad options fail here, before any child is started
    if os.environ.get(WORKER_CHILD_ENV):
        _run_worker_now(spec, pool, regions, concurrency=concurrency, loglevel=loglevel, hostname=hostname)
        return
    raise SystemExit(supervise("worker", WORKER_CHILD_ENV, restart_clean_exit=False))


def _run_worker_now(
    spec: PoolSpec,
    pool: str,
    regions: list[str],
    *,
    concurrency: int | None,
    loglevel: str | None,
    hostname: str | None,
) -> None:
    app = lazy_app.get()
    from certqueue.keyrotation import install_worker_heartbeat
    from certqueue.validation import public_suffixes

    public_suffixes()  # parsed once here, before the pool forks: its processes share it

    install_worker_heartbeat(f"worker:{pool}")
    name = hostname or f"{pool}{'-' + '-'.join(regions) if regions else ''}@%h"
    from certqueue import worker_pool

    # an idle worker stops at once on SIGTERM (billiard's fixed sleeps made it 5-8 s): worker_pool
    app.conf.worker_timer = worker_pool.TIMER
    worker_pool.install_shutdown_tick()
    # -P takes no class path: the pool is set here
    app.conf.worker_pool = worker_pool.POOL if spec.pool == "prefork" else spec.pool
    argv = [
        "worker",
        "-Q",
        ",".join(spec.queues),
        "-c",
        str(concurrency or spec.concurrency),
        "-n",
        name,
        "--loglevel",
        loglevel or get_settings().logging.level,
        "--without-mingle",
        "--without-gossip",
    ]
    if get_settings().monitoring.task_events:
        argv.append("-E")  # else Flower turns events on while it watches (enable_events)
    _exit_after_shutdown(_celery_exit_code(app, argv))


def _celery_exit_code(app: Any, argv: list[str]) -> int:
    """Run celery's command line for ``app`` (as ``app.start`` does) and return its exit status.
    ``app.start`` and ``app.worker_main`` throw it away: a worker that ends on "Unrecoverable
    error" (kombu, when Redis goes away while a message is unacknowledged) returns 1 from click's
    main, which they drop, so the process exited 0 and the supervisor took it for a deliberate
    stop and left the queue unserved."""
    from celery.bin.celery import celery
    from click.exceptions import Abort, ClickException, Exit

    celery.params[0].default = app  # what app.start does: the command line's --app is this app
    try:
        got = celery.main(args=argv, standalone_mode=False)
    except Exit as exc:
        got = exc.exit_code
    except ClickException as exc:  # a bad option: said as click says it, status 2
        exc.show()
        got = exc.exit_code
    except Abort:
        got = 1
    except SystemExit as exc:  # a command that ends with sys.exit
        got = exc.code
    finally:
        celery.params[0].default = None
    if got is None:
        return 0
    return got if isinstance(got, int) else 1


def _exit_after_shutdown(code: int) -> None:
    """End a worker or beat process once celery's shutdown has returned (worker: tasks finished,
    acks sent, broker connection closed; beat: schedule synced): the exit hooks run and the logs are
    flushed, but the interpreter's own teardown of the heap (0.8 s measured, a third of an idle
    worker's stop, more on a loaded machine) is skipped, as celery's pool processes skip it."""
    import atexit

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def run_beat(*, loglevel: str | None = None) -> None:
    """Beat under ``supervise``: celery beat exits when it loses the broker (a Redis restart)."""
    if os.environ.get(BEAT_CHILD_ENV):
        _run_beat_now(loglevel=loglevel)
        return
    supervise("beat", BEAT_CHILD_ENV, restart_clean_exit=True)


def child_argv() -> list[str]:
    """This process's own command line (``certqueue worker ...``, ``python -m certqueue ...``,
    ``workers/acme.py``), so the child gets every option the parent got, global ones included."""
    return [sys.executable, *sys.orig_argv[1:]]


def _die_with_parent() -> None:  # pragma: no cover  (runs in the child between fork and exec)
    """Linux: the child gets SIGTERM if the supervisor is killed, instead of running on unsupervised."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(name: str, child_env: str, *, restart_clean_exit: bool) -> int:
    """Run this same command as a child (``child_env`` set) and restart it whenever it exits on
    its own, after a backoff that grows with consecutive quick failures (``lifecycle.backoff``)
    and starts again after a healthy run. SIGTERM or SIGINT stop it: the child gets SIGTERM, a
    warm shutdown (a Ctrl-C reached it already; a second SIGINT would make it a cold one), and the
    supervisor exits with the child's code. ``restart_clean_exit=False``: a child that exits 0 by
    itself (a remote-control shutdown) is not restarted."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    argv = child_argv()
    failures = 0
    restarts = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(argv, env={**os.environ, child_env: "1"}, preexec_fn=_die_with_parent)
        if stopping:  # told to stop while the child was being started: it missed the signal
            child.send_signal(signal.SIGTERM)
        log.info("%s supervisor: started %s process %d", name, name, child.pid)
        code = child.wait()
        if stopping:
            return _exit_status(code)
        if code == 0 and not restart_clean_exit:
            log.info("%s process %d stopped by itself (exit 0); not restarting", name, child.pid)
            return 0
        failures = 0 if time.monotonic() - started > HEALTHY_RUN_SECONDS else failures + 1
        restarts += 1
        delay = backoff(max(failures, 1), initial=0.5, cap=30.0)
        how = f"signal {-code}" if code < 0 else f"code {code}"
        log.warning(
            "%s process %d exited unexpectedly (%s); restart %d in %.1fs",
            name,
            child.pid,
            how,
            restarts,
            delay,
        )
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return _exit_status(code)


def _exit_status(code: int) -> int:
    """A Popen return code as a shell exit status (killed by signal N: 128 + N)."""
    return code if code >= 0 else 128 - code


def _run_beat_now(*, loglevel: str | None = None) -> None:
    from certqueue.schedule import beat_schedule

    s = get_settings()
    app = lazy_app.get()
    app.conf.beat_schedule = beat_schedule(s)
    argv = ["beat", "--loglevel", loglevel or s.logging.level]
    url = app.conf.broker_url or ""
    if url.startswith(("redis://", "rediss://")):
        app.conf.redbeat_redis_url = url
        # beat renews its lock at every tick: it never sleeps longer than a sixth of the lock's life
        # (a 60 s sleep under a 60 s lock lost the lock: LockNotOwnedError and a restart a minute)
        app.conf.redbeat_lock_timeout = 60
        app.conf.beat_max_loop_interval = 10
        app.conf.redbeat_key_prefix = "certqueue:redbeat:"
        argv += ["-S", "certqueue.beat_scheduler.Scheduler"]  # RedBeat that notices a lost schedule
    else:
        # beside the embedded broker's folder (var/ by default): a relative "var/..." failed in a
        # working directory without var/ (beat then exited at every start, as in the demo)
        schedule = Path(s.broker.filesystem_path).resolve().parent / "celerybeat-schedule"
        schedule.parent.mkdir(parents=True, exist_ok=True)
        argv += ["-s", str(schedule)]
    # returns after beat's shutdown: the schedule synced and closed
    _exit_after_shutdown(_celery_exit_code(app, argv))
