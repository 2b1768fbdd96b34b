"""What a benchmark case leaves behind, so a stalled case can tell why it stalled.

Every case gets a folder ``<results>/<run stamp>-artifacts/<case>/`` (:func:`case_dir`). When the case
ends, the logs of every process it started are copied there (workers, beat, the http01 responder,
Pebble, pebble-challtestsrv, Redis, BIND; certbot/lego/bare runs write their own output there). The
PostgreSQL server is the machine's shared one, not started by the case: instead of its log the
snapshot keeps ``pg_stat_activity`` and the blocked locks of the case's database.

On a stall :func:`stall_snapshot` writes, in this order (the last step kills Pebble):

1. ``state.json``: certificates by state, orders and challenges by status (with the age of the
   oldest open order), the queue depths in Redis (every list, plus kombu's ``unacked`` hash and
   index), the database's sessions with their wait events, and the host's load average;
2. ``ca-orders.json``: the status of the open orders *at the CA*, fetched (POST-as-GET with the
   account the workers use) with a short timeout each: a CA that does not answer shows as
   ``no answer`` entries here, a CA that answers but disagrees with the database shows too;
3. ``pyspy-<pid>.txt``: ``py-spy dump`` of every worker process (main and prefork children);
4. ``pebble-goroutines.txt``: Pebble's goroutines (SIGQUIT makes a Go program print every goroutine's
   stack to stderr and exit), cut out of Pebble's log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.procs import descendants

if TYPE_CHECKING:
    from bench.env import CertqueueStack

log = logging.getLogger("bench")

#: set by the CLI at the start of a run: ``<results>/<stamp>-artifacts``
ROOT: Path | None = None
_OPEN = ("creating", "pending", "ready", "processing")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "case"


def case_dir(name: str) -> Path:
    """A new folder for one case's artifacts (numbered when the same case runs again)."""
    root = ROOT or Path(os.environ.get("TMPDIR", "/tmp")) / "certqueue-bench-artifacts"
    root.mkdir(parents=True, exist_ok=True)
    base = _slug(name)
    for k in range(1, 1000):
        d = root / (base if k == 1 else f"{base}.{k}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"too many artifact folders for {name}")


def copy_logs(dest: Path, files: Iterable[tuple[str, Path | None]]) -> list[str]:
    """Copy each (name, path) that exists into ``dest/logs``; returns the names copied."""
    out = dest / "logs"
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name, path in files:
        if path is None or not path.exists():
            continue
        try:
            shutil.copyfile(path, out / name)
            copied.append(name)
        except OSError as exc:
            log.warning("could not keep %s: %s", path, exc)
    return copied


def pyspy_binary() -> Path | None:
    from bench import peers

    if peers.PYSPY.exists():
        return peers.PYSPY
    beside = Path(sys.executable).parent / "py-spy"  # `make bench` installs it into the venv
    if beside.exists():
        return beside
    found = shutil.which("py-spy")
    return Path(found) if found else None


def pyspy_dump(dest: Path, roots: Iterable[int]) -> list[str]:
    """``py-spy dump`` of every process in the trees at ``roots``; returns the files written."""
    spy = pyspy_binary()
    if spy is None:
        (dest / "pyspy-missing.txt").write_text("py-spy not installed (bench.peers.ensure_certbot)\n")
        return []
    written = []
    for root in roots:
        for pid in descendants(root):
            try:
                p = subprocess.run(
                    [str(spy), "dump", "--pid", str(pid), "--locals"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                text = p.stdout + (f"\n[stderr]\n{p.stderr}" if p.stderr.strip() else "")
            except (subprocess.SubprocessError, OSError) as exc:
                text = f"py-spy dump failed: {type(exc).__name__}: {exc}\n"
            f = dest / f"pyspy-{pid}.txt"
            f.write_text(text)
            written.append(f.name)
    return written


def go_goroutine_dump(proc: subprocess.Popen[bytes] | None, log_path: Path, dest: Path) -> str | None:
    """SIGQUIT a Go process (it prints every goroutine and exits), then keep that part of its log."""
    if proc is None or proc.poll() is not None:
        return None
    try:
        mark = log_path.stat().st_size
    except OSError:
        mark = 0
    try:
        os.kill(proc.pid, signal.SIGQUIT)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        with open(log_path, "rb") as f:
            f.seek(mark)
            dump = f.read().decode(errors="replace")
    except OSError:
        return None
    out = dest / "pebble-goroutines.txt"
    out.write_text(dump)
    return out.name


def goroutine_summary(dump: str) -> dict[str, Any]:
    """Count goroutines by state and by the first Pebble frame (what they are waiting on)."""
    states: dict[str, int] = {}
    where: dict[str, int] = {}
    for block in dump.split("\n\n"):
        head = re.match(r"goroutine \d+ \[([^\],]+)", block.strip())
        if not head:
            continue
        states[head.group(1)] = states.get(head.group(1), 0) + 1
        frame = next(
            (
                ln.strip().split("(")[0]
                for ln in block.splitlines()
                if "pebble" in ln and not ln.startswith("\t") and "goroutine" not in ln
            ),
            "-",
        )
        key = f"{head.group(1)} @ {frame}"
        where[key] = where.get(key, 0) + 1
    top = dict(sorted(where.items(), key=lambda kv: -kv[1])[:25])
    return {"goroutines": sum(states.values()), "by_state": states, "top_waits": top}


#: Pebble 2.4.0's memory-store lock cycle (TEST-SERVERS.md, docs/performance.md): nearly every
#: goroutine waits on a mutex, and none of them gets it again
DEADLOCK_MIN_GOROUTINES = 50
DEADLOCK_SHARE = 0.8


def pebble_deadlocked(summary: dict[str, Any] | None) -> bool:
    """Whether a goroutine summary (:func:`goroutine_summary`) shows Pebble deadlocked: at least
    ``DEADLOCK_MIN_GOROUTINES`` goroutines, ``DEADLOCK_SHARE`` of them waiting on a mutex
    (``semacquire``). An idle or merely busy Pebble has a few goroutines in ``IO wait`` instead."""
    if not summary:
        return False
    total = int(summary.get("goroutines") or 0)
    waiting = int((summary.get("by_state") or {}).get("semacquire", 0))
    return total >= DEADLOCK_MIN_GOROUTINES and waiting >= DEADLOCK_SHARE * total


def redis_depths(url: str) -> dict[str, Any]:
    import redis as redis_lib

    r = redis_lib.Redis.from_url(url, socket_timeout=5)
    out: dict[str, Any] = {}
    for key in r.scan_iter(count=1000):
        k = key.decode(errors="replace")
        raw = r.type(key)
        t = raw.decode() if isinstance(raw, bytes) else str(raw)
        if t == "list":
            out[k] = int(r.llen(key))
        elif k.startswith("unacked") and t == "hash":
            out[k] = int(r.hlen(key))
        elif k.startswith("unacked") and t == "zset":
            out[k] = int(r.zcard(key))
    return out


def _one(row: Any) -> Any:
    return row[0] if row else None


def db_state(db_url: str) -> dict[str, Any]:
    """Certificates by state, orders and challenges by status, the oldest open order, sessions."""
    import psycopg

    from bench.procs import PG_ADMIN

    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    name = dsn.rsplit("/", 1)[1]
    out: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET statement_timeout = '20s'")
        out["certificates_by_state"] = dict(
            conn.execute("SELECT state, count(*) FROM certificates GROUP BY state").fetchall()
        )
        out["orders_by_status"] = dict(
            conn.execute("SELECT status, count(*) FROM orders GROUP BY status").fetchall()
        )
        out["challenges_by_status"] = dict(
            conn.execute("SELECT status, count(*) FROM challenges GROUP BY status").fetchall()
        )
        row = conn.execute(
            "SELECT min(updated_at), max(updated_at), min(created_at) FROM orders WHERE status = ANY(%s)",
            (list(_OPEN),),
        ).fetchone()
        out["open_orders_updated_oldest_newest_created_oldest"] = [str(v) for v in row] if row else None
        out["open_orders_by_status_and_polls"] = [
            list(r)
            for r in conn.execute(
                "SELECT status, polls, count(*) FROM orders WHERE status = ANY(%s) "
                "GROUP BY status, polls ORDER BY 3 DESC LIMIT 30",
                (list(_OPEN),),
            ).fetchall()
        ]
        out["renewing_without_open_order"] = _one(
            conn.execute(
                "SELECT count(*) FROM certificates c WHERE state IN ('RENEWING','ISSUING') AND NOT EXISTS "
                "(SELECT 1 FROM orders o WHERE o.certificate_id = c.id AND o.status = ANY(%s))",
                (list(_OPEN),),
            ).fetchone()
        )
        out["recent_events"] = [
            [str(v) for v in r]
            for r in conn.execute(
                "SELECT kind, to_state, reason, count(*), max(at) FROM events "
                "WHERE at > now() - interval '5 minutes' GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 30"
            ).fetchall()
        ]
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        out["pg_sessions"] = [
            [str(v) for v in r]
            for r in conn.execute(
                "SELECT state, wait_event_type, wait_event, count(*), "
                "max(now() - xact_start), left(max(query), 160) FROM pg_stat_activity "
                "WHERE datname = %s GROUP BY 1, 2, 3",
                (name,),
            ).fetchall()
        ]
        out["pg_blocked_locks"] = _one(
            conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND a.datname = %s",
                (name,),
            ).fetchone()
        )
    return out


def ca_order_status(cs: CertqueueStack, limit: int = 200, timeout: float = 90.0) -> dict[str, Any]:
    """The CA's view of up to ``limit`` open orders (POST-as-GET with the workers' account)."""
    from sqlalchemy import select

    from certqueue.acme.accounts import client_for
    from certqueue.acme.client import order_from_json
    from certqueue.config import get_settings
    from certqueue.db import session_scope
    from certqueue.models import Order

    settings = get_settings()
    with session_scope(write=False) as s:
        rows = s.execute(
            select(Order.id, Order.status, Order.order_json)
            .where(Order.status.in_(_OPEN), Order.order_json.is_not(None))
            .order_by(Order.updated_at)
            .limit(limit)
        ).all()
        if not rows:
            return {"checked": 0}
        client, _ = client_for(s, str(settings.acme.directory_url), settings.acme.email or "")
    results: dict[str, int] = {}
    pairs: dict[str, int] = {}

    def one(row: Any) -> tuple[str, str]:
        from certqueue.acme.accounts import make_client

        c = make_client(client.directory_url, client.account_key, client.account_url, settings)
        c.timeout = 10
        try:
            order = c.refresh_order(order_from_json(row.order_json))
            return row.status, str(order.body.status.name if order.body.status else "?")
        except Exception as exc:
            return row.status, f"no answer ({type(exc).__name__})"

    with ThreadPoolExecutor(max_workers=8) as pool:
        futs = [pool.submit(one, r) for r in rows]
        done, not_done = wait(futs, timeout=timeout)
        for f in done:
            ours, theirs = f.result()
            results[theirs] = results.get(theirs, 0) + 1
            pairs[f"db {ours} / ca {theirs}"] = pairs.get(f"db {ours} / ca {theirs}", 0) + 1
        for f in not_done:
            f.cancel()
    if not_done:
        results["not finished in time"] = len(not_done)
    return {"checked": len(rows), "at_ca": results, "db_vs_ca": pairs}


def stall_snapshot(cs: CertqueueStack, dest: Path, *, why: str) -> dict[str, Any]:
    """Everything that says where a stalled case is stuck; ends by killing Pebble (SIGQUIT)."""
    t0 = time.monotonic()
    snap: dict[str, Any] = {
        "why": why,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": os.getloadavg(),
    }
    steps: list[tuple[str, Any]] = [
        ("db", lambda: db_state(cs.db_url)),
        ("queues", lambda: redis_depths(cs.redis.url)),
        ("processes_alive", lambda: {n: p.poll() is None for n, p in cs.stack.procs.items()}),
    ]
    for key, fn in steps:
        try:
            snap[key] = fn()
        except Exception as exc:
            snap[key] = f"failed: {type(exc).__name__}: {exc}"
    (dest / "state.json").write_text(json.dumps(snap, indent=2, default=str) + "\n")
    try:
        ca = ca_order_status(cs)
    except Exception as exc:
        ca = {"failed": f"{type(exc).__name__}: {exc}"}
    (dest / "ca-orders.json").write_text(json.dumps(ca, indent=2, default=str) + "\n")
    snap["ca_orders"] = ca
    snap["pyspy_files"] = pyspy_dump(dest, cs.worker_pids())
    pebble_log = cs.pebble.log_path if cs.pebble.workdir else None
    name = go_goroutine_dump(cs.pebble.proc, pebble_log, dest) if pebble_log else None
    snap["pebble_goroutines_file"] = name
    if name:
        snap["pebble_goroutines"] = goroutine_summary((dest / name).read_text(errors="replace"))
    snap["snapshot_s"] = time.monotonic() - t0
    (dest / "state.json").write_text(json.dumps(snap, indent=2, default=str) + "\n")
    return snap
