"""certqueue's issuance throughput (HTTP-01 or DNS-01) and where its time goes.

N certificates are created as REQUESTED rows, then N ``certqueue.issue`` tasks are sent at once to
real worker pools. Throughput is N over the time from the first send to the last ACTIVE transition;
time per certificate is from the certificate's ``order`` event (the first task started on it) to its
ACTIVE transition. A warm-up batch (one certificate per worker process slot) runs first, uncounted,
so account registration and imports are not in the measurement.

The profile (per task type) joins Celery's task events (sent/received/started/succeeded/retried,
captured in this process) with the per-task SQL and HTTP counters of ``bench/instrument``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select

from bench.env import CertqueueStack, read_instrument
from bench.procs import percentile, pg_stat, postgres_backend_cpu
from bench.report import CaseResult
from certqueue import certificates
from certqueue.celery_app import lazy_app
from certqueue.db import session_scope
from certqueue.models import Certificate, Event, Order, State

log = logging.getLogger("bench")


class EventLog:
    """Celery task events captured in a thread: per execution, time in queue and running time."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.ready_at: dict[str, float] = {}
        self.started_at: dict[str, float] = {}
        self.queue_wait: dict[str, list[float]] = defaultdict(list)
        self.run: dict[str, list[float]] = defaultdict(list)
        self.outcomes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._recv: Any = None

    def _on(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type", "")
        uuid = ev.get("uuid")
        if not uuid or not kind.startswith("task-"):
            return
        ts = float(ev.get("timestamp", time.time()))
        with self._lock:
            if ev.get("name"):
                self.names[uuid] = ev["name"]
            if kind in ("task-sent", "task-received"):
                eta = ev.get("eta")
                if eta:
                    try:
                        self.ready_at[uuid] = dt.datetime.fromisoformat(eta).timestamp()
                    except ValueError:
                        self.ready_at.setdefault(uuid, ts)
                else:
                    self.ready_at.setdefault(uuid, ts)
            elif kind == "task-started":
                name = self.names.get(uuid, "?")
                ready = self.ready_at.pop(uuid, None)
                if ready is not None:
                    self.queue_wait[name].append(max(0.0, ts - ready))
                self.started_at[uuid] = ts
            elif kind in ("task-succeeded", "task-retried", "task-failed"):
                name = self.names.get(uuid, "?")
                start = self.started_at.pop(uuid, None)
                runtime = ev.get("runtime")
                if runtime is None and start is not None:
                    runtime = ts - start
                if runtime is not None:
                    self.run[name].append(float(runtime))
                self.outcomes[name][kind.removeprefix("task-")] += 1

    def start(self) -> None:
        app = lazy_app.get()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    with app.connection_for_read() as conn:
                        recv = app.events.Receiver(conn, handlers={"*": self._on})
                        self._recv = recv
                        recv.capture(limit=None, timeout=None, wakeup=False)
                except Exception as exc:
                    log.warning("event capture: %s", type(exc).__name__)
                    time.sleep(0.2)

        self._thread = threading.Thread(target=loop, daemon=True, name="bench-events")
        self._thread.start()
        time.sleep(0.5)  # let the receiver subscribe before anything is sent

    def stop(self) -> None:
        self._stop.set()
        if self._recv is not None:
            self._recv.should_stop = True
        if self._thread is not None:
            self._thread.join(timeout=5)


def create_requests(names: list[list[str]], **kw: Any) -> list[str]:
    ids = []
    with session_scope() as s:
        for domains in names:
            req = certificates.CertificateRequest.build(domains=domains, **kw)
            cert, _ = certificates.create_certificate(s, req, actor="bench")
            ids.append(cert.id)
    return ids


def send_issue(ids: list[str]) -> None:
    app = lazy_app.get()
    with app.producer_or_acquire() as producer:
        for cid in ids:
            app.send_task(
                "certqueue.issue", args=[{"v": 1, "certificate_id": cid}], queue="acme", producer=producer
            )


def bulk_request(reqs: list[certificates.CertificateRequest]) -> list[str]:
    """What the bulk API does: every row and its issue intent in one transaction, then a nudge."""
    from certqueue import nudge, operations

    with session_scope() as s:
        ids = [c.id for c, _ in operations.request_issue_many(s, reqs, actor="bench")]
    nudge.nudge()
    nudge.flush()
    return ids


def count_state(ids: list[str], state: str) -> int:
    with session_scope(write=False) as s:
        return int(
            s.execute(
                select(func.count())
                .select_from(Certificate)
                .where(Certificate.id.in_(ids), Certificate.state == state)
            ).scalar_one()
        )


def wait_all(ids: list[str], *, timeout: float, stall: float, poll: float = 0.5) -> tuple[int, str, int]:
    """Wait until every id is ACTIVE: (active count, status, polls made)."""
    deadline = time.monotonic() + timeout
    last_progress, last = time.monotonic(), -1
    polls = 0
    while True:
        done = count_state(ids, State.ACTIVE)
        failed = count_state(ids, State.FAILED)
        polls += 2
        if done + failed >= len(ids):
            return done, ("ok" if failed == 0 else "partial"), polls
        now = time.monotonic()
        if done != last:
            last, last_progress = done, now
        if now - last_progress > stall:
            return done, "stalled", polls
        if now > deadline:
            return done, "timeout", polls
        time.sleep(poll)


def latencies(ids: list[str]) -> tuple[list[float], dt.datetime | None]:
    """Per certificate: order event -> ACTIVE transition (seconds); and the last ACTIVE time."""
    with session_scope(write=False) as s:
        first = dict(
            s.execute(
                select(Event.certificate_id, func.min(Event.at))
                .where(Event.certificate_id.in_(ids), Event.kind == "order")
                .group_by(Event.certificate_id)
            ).all()
        )
        active = dict(
            s.execute(
                select(Event.certificate_id, func.max(Event.at))
                .where(Event.certificate_id.in_(ids), Event.kind == "transition", Event.to_state == "ACTIVE")
                .group_by(Event.certificate_id)
            ).all()
        )
    lat = [(active[c] - first[c]).total_seconds() for c in ids if c in active and c in first]
    return lat, (max(active.values()) if active else None)


def count_orders(ids: list[str]) -> int:
    with session_scope(write=False) as s:
        return int(
            s.execute(
                select(func.count()).select_from(Order).where(Order.certificate_id.in_(ids))
            ).scalar_one()
        )


def _diff(after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, c in after.items():
        b = before.get(task, {})
        out[task] = {k: v - b.get(k, 0) for k, v in c.items()}
    return out


def run_certqueue(
    cs: CertqueueStack,
    *,
    name: str,
    group: str,
    n: int,
    domains_for: Any,
    request_kw: dict[str, Any],
    warmup: int,
    timeout: float,
    stall: float,
) -> tuple[CaseResult, dict[str, Any]]:
    """Issue ``n`` certificates through the running workers; returns the case and its profile."""
    result = CaseResult(name=name, group=group, n=n)
    if warmup:
        wids = create_requests([domains_for(f"warm{i}") for i in range(warmup)], **request_kw)
        send_issue(wids)
        wait_all(wids, timeout=min(timeout, 120), stall=stall)
    ids = create_requests([domains_for(str(i)) for i in range(n)], **request_kw)
    events = EventLog()
    events.start()
    time.sleep(0.6)  # let the instrument files catch up with the warm-up
    instr_before = read_instrument(cs.instrument_dir) if cs.instrument_dir.exists() else {}
    pg_before = pg_stat(cs.db_url)
    cpu0, peb0 = cs.client_cpu(), cs.pebble_cpu()
    pgcpu0 = postgres_backend_cpu(cs.db_url)
    t0_wall = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    send_issue(ids)
    send_s = time.monotonic() - t0
    done, status, polls = wait_all(ids, timeout=timeout, stall=stall)
    wall_poll = time.monotonic() - t0
    cpu1, peb1 = cs.client_cpu(), cs.pebble_cpu()
    pgcpu1 = postgres_backend_cpu(cs.db_url)
    lat, last_active = latencies(ids)
    events.stop()
    result.ok = done
    result.status = status
    result.wall_s = (last_active - t0_wall).total_seconds() if last_active and done else wall_poll
    result.latencies_s = lat
    result.client_cpu_s = cpu1 - cpu0
    result.pebble_cpu_s = peb1 - peb0
    result.extra = {
        "send_s": send_s,
        "orders": count_orders(ids),
        "warmup": warmup,
        # the PostgreSQL server's work for this client (not in client CPU): its backends' CPU
        "postgres_cpu_per_cert_s": (pgcpu1 - pgcpu0) / done if done else None,
    }
    # stop the workers so their counters (instrument files, pg stats) are flushed
    cs.stop_workers()
    time.sleep(1.0)
    pg_after = pg_stat(cs.db_url)
    instr = _diff(read_instrument(cs.instrument_dir), instr_before) if cs.instrument_dir.exists() else {}
    profile = build_profile(events, instr, pg_before, pg_after, n=max(done, 1), bench_polls=polls)
    return result, profile


def build_profile(
    events: EventLog,
    instr: dict[str, dict[str, float]],
    pg0: dict[str, int],
    pg1: dict[str, int],
    *,
    n: int,
    bench_polls: int,
) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    names = set(events.run) | set(events.queue_wait) | {k for k in instr if k != "-"}
    total_exec = 0
    total_sql = 0.0
    total_http = 0.0
    for name in sorted(names):
        runs = events.run.get(name, [])
        waits = events.queue_wait.get(name, [])
        c = instr.get(name, {})
        execs = int(c.get("task_n", 0)) or len(runs)
        total_exec += execs
        total_sql += c.get("sql_n", 0)
        total_http += c.get("http_n", 0)
        tasks[name] = {
            "executions": execs,
            "per_cert": execs / n,
            "outcomes": dict(events.outcomes.get(name, {})),
            "queue_p50_s": percentile(waits, 0.5),
            "queue_p95_s": percentile(waits, 0.95),
            "run_mean_ms": (sum(runs) / len(runs) * 1000) if runs else None,
            "run_p95_ms": (percentile(runs, 0.95) or 0) * 1000 if runs else None,
            "db_statements_per_exec": c.get("sql_n", 0) / execs if execs else None,
            "db_ms_per_exec": c.get("sql_s", 0) * 1000 / execs if execs else None,
            "db_commits_per_exec": c.get("commit_n", 0) / execs if execs else None,
            "http_calls_per_exec": c.get("http_n", 0) / execs if execs else None,
            "http_ms_per_exec": c.get("http_s", 0) * 1000 / execs if execs else None,
        }
    delta = {k: pg1.get(k, 0) - pg0.get(k, 0) for k in pg1}
    # the bench's own progress polls are read-only transactions on the same database
    xacts = delta.get("xact_commit", 0) + delta.get("xact_rollback", 0) - bench_polls
    return {
        "tasks": tasks,
        "per_cert": {
            "tasks": total_exec / n,
            "sql_statements": total_sql / n,
            "acme_http_requests": total_http / n,
            "pg_transactions": xacts / n,
            "pg_tuples_inserted": delta.get("tup_inserted", 0) / n,
            "pg_tuples_updated": delta.get("tup_updated", 0) / n,
            "pg_tuples_deleted": delta.get("tup_deleted", 0) / n,
        },
        "pg_stat_delta": delta,
        # with BENCH_SQL_SHAPES=1: statements per certificate by verb and table, most first
        "sql_shapes_per_cert": _shapes(instr, n),
        # with BENCH_SQL_SITES=1: the same by the certqueue code that issued them
        "sql_sites_per_cert": _shapes(instr, n, prefix="site:"),
        "instrument_raw": instr,
    }


def _shapes(instr: dict[str, dict[str, float]], n: int, prefix: str = "shape:") -> dict[str, float]:
    merged: dict[str, float] = {}
    for c in instr.values():
        for key, value in c.items():
            if key.startswith(prefix) and key.endswith("_n"):
                shape = key[len(prefix) : -len("_n")]
                merged[shape] = merged.get(shape, 0) + value
    return {k: round(v / n, 2) for k, v in sorted(merged.items(), key=lambda kv: -kv[1])}


def run_certqueue_timed(
    cs: CertqueueStack,
    *,
    name: str,
    group: str,
    n: int,
    domains_for: Any,
    request_kw: dict[str, Any],
    warmup: int,
    timeout: float,
    stall: float,
    intake: str = "tasks",
) -> CaseResult:
    """An uninstrumented throughput run with a start barrier.

    The warm-up (account registration, imports, connection pools) runs first, uncounted. Then the
    workers stop consuming ``acme`` (``cancel_consumer``), all ``n`` rows are created and all ``n``
    tasks are published while nothing consumes them, and the clock starts when the workers are told to
    consume again (``add_consumer``): the bench's own ``send_task`` calls are outside the window, as
    the bare loop's queue is filled before its clock. Wall time runs from that barrier to the last
    ACTIVE transition (from the events table); no task events are consumed by the bench.

    ``intake="bulk"``: the requests come the way ``POST /v1/certificates/bulk`` and
    ``certqueue issue --from-file`` send them instead: the clock starts first, then all ``n`` rows
    and their issue intents are written in one transaction (in the bench process) and dispatch is
    nudged; no ``certqueue.issue`` task runs, and the rows' and intents' writing is inside the window.
    """
    from bench.procs import SystemMeter

    result = CaseResult(name=name, group=group, n=n)
    if warmup:
        wids = create_requests([domains_for(f"warm{i}") for i in range(warmup)], **request_kw)
        send_issue(wids)
        wait_all(wids, timeout=min(timeout, 180), stall=stall)
    app = lazy_app.get()
    meter = SystemMeter(cs)
    if intake == "bulk":
        reqs = [
            certificates.CertificateRequest.build(domains=domains_for(str(i)), **request_kw) for i in range(n)
        ]
        meter.start()
        result.loadavg_before = os.getloadavg()
        t0_wall = dt.datetime.now(dt.UTC)
        t0 = time.monotonic()
        ids = bulk_request(reqs)
    else:
        dest = [f"{w}@{socket.gethostname()}" for w in cs.workers if "acme" in w]
        app.control.cancel_consumer("acme", destination=dest, reply=True, timeout=10)
        ids = create_requests([domains_for(str(i)) for i in range(n)], **request_kw)
        send_issue(ids)
        meter.start()
        result.loadavg_before = os.getloadavg()
        t0_wall = dt.datetime.now(dt.UTC)
        t0 = time.monotonic()
        app.control.add_consumer("acme", destination=dest, reply=True, timeout=10)
    done, status, _polls = wait_all(ids, timeout=timeout, stall=stall, poll=1.0)
    wall_poll = time.monotonic() - t0
    result.loadavg_after = os.getloadavg()
    cpu = meter.stop()
    if status in ("stalled", "timeout") and cs.artifacts is not None:
        from bench.diag import pebble_deadlocked, stall_snapshot

        snap = stall_snapshot(cs, cs.artifacts, why=f"{status}: {done}/{n} active")
        result.extra["stall_snapshot"] = {k: snap.get(k) for k in ("db", "queues", "ca_orders")}
        result.extra["pebble_deadlock"] = pebble_deadlocked(snap.get("pebble_goroutines"))
    lat, last_active = latencies(ids)
    result.ok = done
    result.status = status
    result.wall_s = (last_active - t0_wall).total_seconds() if last_active and done else wall_poll
    result.latencies_s = lat
    result.cpu_s = cpu
    result.client_cpu_s = cpu.get("client")
    result.pebble_cpu_s = cpu.get("pebble")
    result.peak_rss_mb = meter.peak_rss_mb
    result.extra.update(orders=count_orders(ids), warmup=warmup, artifacts=str(cs.artifacts))
    return result
