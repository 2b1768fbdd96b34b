"""The due-scan at scale: ``rows`` certificate rows generated in PostgreSQL with one
``INSERT ... SELECT generate_series`` (no CA, no keys), 1% of them ACTIVE and due.

Reports the time of one claim (:func:`certqueue.tasks.scan.claim_due`, rolled back so it can be
repeated) at ``automation.scan_batch_size`` and at 10,000, the time to enqueue the claimed work the
way dispatch does (``certqueue.acme.issue_batch`` messages of ``automation.batch_size`` starts, sent
in groups of ``ENQUEUE_CHUNK``) into a private Redis, and the ``EXPLAIN (ANALYZE, BUFFERS)`` of the
claim's SELECT as certqueue sends it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from bench.procs import RedisServer, create_database

INDEX = "ix_certificates_state_renew_at"

FILL_SQL = """
INSERT INTO certificates (id, domains, dedupe_key, state, key_type, challenge_type, challenge_map,
    directory_url, targets, auto_renew, reuse_key, external, renew_at, attempts, force_new_key,
    created_at, updated_at)
SELECT 'cert_scan' || lpad(g::text, 10, '0'),
       json_build_array('h' || g || '.scan.test'),
       md5(g::text) || md5((g + 7)::text),
       CASE WHEN g %% 50 = 0 THEN 'FAILED' WHEN g %% 50 = 25 THEN 'REVOKED' ELSE 'ACTIVE' END,
       'ec256', 'http-01', '{}'::json, 'https://ca.invalid/dir', '[]'::json, true, false, false,
       CASE WHEN g %% 100 = 1 THEN now() - (g %% 3600) * interval '1 second'
            ELSE now() + ((g %% 80) + 1) * interval '1 day' + (g %% 86400) * interval '1 second' END,
       0, false, now(), now()
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g
"""


def _fill(url: str, rows: int) -> float:
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        step = 250_000
        for lo in range(1, rows + 1, step):
            conn.execute(FILL_SQL, {"lo": lo, "hi": min(rows, lo + step - 1)})  # type: ignore[arg-type]
        conn.execute("VACUUM ANALYZE certificates")
    return time.monotonic() - t0


def run_scan(rows: int, repeats: int = 5) -> dict[str, Any]:
    from certqueue.celery_app import lazy_app
    from certqueue.config import load_settings, set_settings
    from certqueue.db import dispose_all, get_engine, sessionmaker_for
    from certqueue.models import utcnow
    from certqueue.tasks.pipeline import task
    from certqueue.tasks.scan import ENQUEUE_CHUNK, NEW_WORK_PRIORITY, claim_due

    url, drop = create_database("cq_bench_scan")
    redis = RedisServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="certqueue-bench-scan-"))
    (workdir / "settings").mkdir()
    env = {
        "CERTQUEUE_DATABASE__URL": url,
        "CERTQUEUE_BROKER__URL": redis.url,
        "CERTQUEUE_SETTINGS_DIR": str(workdir / "settings"),
    }
    out: dict[str, Any] = {"rows": rows, "due": 0}
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CERTQUEUE_")}
        subprocess.run(
            [sys.executable, "-m", "certqueue", "db", "upgrade"],
            env={**base, **env},
            check=True,
            capture_output=True,
            timeout=120,
            cwd=workdir,
        )
        out["fill_s"] = _fill(url, rows)
        settings = load_settings(environ=env, directory=workdir / "settings").settings
        set_settings(settings)
        dispose_all()
        lazy_app.reset()
        batch = settings.automation.scan_batch_size
        maker = sessionmaker_for()
        with maker() as s:
            out["due"] = int(
                s.execute(
                    text("SELECT count(*) FROM certificates WHERE state='ACTIVE' AND renew_at <= now()")
                ).scalar_one()
            )
        captured: list[tuple[str, Any]] = []

        def grab(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            if statement.lstrip().upper().startswith("SELECT") and "FOR UPDATE" in statement:
                captured.append((statement, parameters))

        engine: Engine = get_engine()
        for limit in (batch, 10_000):
            times = []
            claimed = 0
            for i in range(repeats):
                if i == 0 and limit == batch:
                    event.listen(engine, "before_cursor_execute", grab)
                with maker() as s:
                    t0 = time.perf_counter()
                    ids = claim_due(s, utcnow(), limit)
                    times.append(time.perf_counter() - t0)
                    claimed = len(ids)
                    s.rollback()
                if i == 0 and limit == batch:
                    event.remove(engine, "before_cursor_execute", grab)
            out[f"claim_{limit}"] = {
                "claimed": claimed,
                "first_s": times[0],
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "repeats": repeats,
            }
        # EXPLAIN of the SELECT exactly as certqueue sent it
        if captured:
            stmt, params = captured[0]
            with engine.connect() as conn:
                raw = conn.connection.driver_connection
                assert raw is not None
                cur = raw.cursor()
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + stmt, params)
                plan = "\n".join(r[0] for r in cur.fetchall())
                conn.rollback()
            out["explain_sql"] = stmt
            out["explain"] = plan
            out["index_scan_on_state_renew_at"] = (
                f"Index Scan using {INDEX}" in plan or f"Index Only Scan using {INDEX}" in plan
            )
        # one real claim of everything due, then enqueue it the way the scan task does
        with maker() as s:
            t0 = time.perf_counter()
            ids = claim_due(s, utcnow(), max(10_000, out["due"]))
            s.commit()
            out["claim_all_commit_s"] = time.perf_counter() - t0
        from celery import group

        app = lazy_app.get()
        size = settings.automation.batch_size
        starts = [{"certificate_id": cid, "purpose": "renew"} for cid in ids]
        t0 = time.perf_counter()
        sigs = [
            task("certqueue.acme.issue_batch", starts[i : i + size], priority=NEW_WORK_PRIORITY)
            for i in range(0, len(starts), size)
        ]
        with app.producer_or_acquire():
            for i in range(0, len(sigs), ENQUEUE_CHUNK):
                group(sigs[i : i + ENQUEUE_CHUNK]).apply_async()
        out["enqueue_s"] = time.perf_counter() - t0
        out["enqueued"] = len(ids)
        out["messages"] = len(sigs)
        import redis as redis_lib

        from certqueue.brokerstate import KOMBU_PRIORITY_SEP, KOMBU_PRIORITY_STEPS

        client = redis_lib.Redis.from_url(redis.url, socket_timeout=5)
        # messages (each a batch of starts), over kombu's one list per priority step
        keys = ["acme" if p == 0 else f"acme{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS]
        out["queue_depth_after"] = sum(int(client.llen(k)) for k in keys)
        out["target_claim_under_1s"] = out[f"claim_{batch}"]["median_s"] < 1.0
        out["claim_10000_under_1s"] = out["claim_10000"]["median_s"] < 1.0
    finally:
        set_settings(None)
        dispose_all()
        lazy_app.reset()
        redis.stop()
        drop()
    return out
