"""Starting worker pools and beat (the ``workers/`` and ``beat/`` entry points call these).

Per-pool settings: the queues each pool consumes, concurrency, pool type, prefetch. The acme pool
also consumes ``scan`` (beat's periodic tasks are light); the propagate pool consumes only the
queues of the regions it is started for, so a region's credentials exist only where it runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from certqueue.celery_app import lazy_app, region_queue
from certqueue.config import get_settings
from certqueue.errors import ConfigError

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
        return PoolSpec(("acme", "scan"), b.acme_concurrency)
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
        qs = ["acme", "scan", "dns"] + [region_queue(r.name) for r in s.multi_region.regions]
        return PoolSpec(tuple(qs), max(b.acme_concurrency, 2))
    raise ConfigError(f"unknown pool {pool!r}", key="--pool")


def run_worker(
    pool: str,
    regions: list[str],
    *,
    concurrency: int | None = None,
    loglevel: str | None = None,
    hostname: str | None = None,
) -> None:
    spec = pool_spec(pool, regions)
    app = lazy_app.get()
    name = hostname or f"{pool}{'-' + '-'.join(regions) if regions else ''}@%h"
    argv = [
        "worker",
        "-Q",
        ",".join(spec.queues),
        "-c",
        str(concurrency or spec.concurrency),
        "-P",
        spec.pool,
        "-n",
        name,
        "--loglevel",
        loglevel or get_settings().logging.level,
        "--without-mingle",
        "--without-gossip",
        "-E",
    ]
    app.worker_main(argv)


def run_beat(*, loglevel: str | None = None) -> None:
    """Beat under a small supervisor: celery beat exits when it loses the broker (a Redis restart),
    so the parent restarts it with backoff until it is told to stop (SIGTERM/SIGINT)."""
    if os.environ.get("CERTQUEUE_BEAT_CHILD"):
        _run_beat_now(loglevel=loglevel)
        return
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    argv = [sys.executable, "-m", "certqueue", "beat"] + (["--loglevel", loglevel] if loglevel else [])
    failures = 0
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen(argv, env={**os.environ, "CERTQUEUE_BEAT_CHILD": "1"})
        code = child.wait()
        if stopping:
            break
        failures = 0 if time.monotonic() - started > 60 else failures + 1
        delay = min(30.0, 0.5 * 2**failures)
        log.warning("beat exited with %s; restarting in %.1fs", code, delay)
        time.sleep(delay)


def _run_beat_now(*, loglevel: str | None = None) -> None:
    from certqueue.schedule import beat_schedule

    s = get_settings()
    app = lazy_app.get()
    app.conf.beat_schedule = beat_schedule(s)
    argv = ["beat", "--loglevel", loglevel or s.logging.level]
    url = app.conf.broker_url or ""
    if url.startswith(("redis://", "rediss://")):
        app.conf.redbeat_redis_url = url
        app.conf.redbeat_lock_timeout = 60
        app.conf.redbeat_key_prefix = "certqueue:redbeat:"
        argv += ["-S", "redbeat.RedBeatScheduler"]
    else:
        argv += ["-s", "var/celerybeat-schedule"]
    app.start(argv)
