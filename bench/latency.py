"""Latency: one certificate at a time, from the request to ACTIVE, with the shipped settings.

certqueue runs with no bench overrides (shipped polling intervals, rate limits on, the pool's shipped
concurrency), on PostgreSQL + Redis and on the embedded default (SQLite, filesystem broker, one
``--pool all`` worker). Each certificate is requested only after the previous one is ACTIVE; the
time is from just before the request's row is created to its ACTIVE transition (the events table).
certbot and lego are timed the same way, one process run per certificate (their sequential runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import time
from typing import Any

from bench import peers
from bench.cq_issue import create_requests, latencies, send_issue, wait_all
from bench.env import build_stack
from bench.stats import percentile


def _certqueue(n: int, backend: str, timeout: float, stall: float) -> dict[str, Any]:
    cs = build_stack(instrument=False, shipped=True, backend=backend, case=f"latency {backend}")
    try:
        cs.start_workers("acme" if backend == "postgres" else "all", 1, 0)
        tag = secrets.token_hex(2)
        # warm-up: account registration and first imports are not a steady-state request
        warm = create_requests([[f"lw{tag}.lat{tag}w.test"]])
        send_issue(warm)
        wait_all(warm, timeout=min(timeout, 180), stall=stall)
        lat: list[float] = []
        status = "ok"
        for i in range(n):
            t0 = dt.datetime.now(dt.UTC)
            ids = create_requests([[f"l{tag}-{i}.lat{tag}{i}.test"]])
            send_issue(ids)
            _done, st, _ = wait_all(ids, timeout=timeout, stall=stall, poll=0.05)
            if st != "ok":
                status = st
                break
            _, last = latencies(ids)
            if last is not None:
                lat.append((last - t0).total_seconds())
        return {
            "status": status,
            "n": len(lat),
            "p50_s": percentile(lat, 0.5),
            "p95_s": percentile(lat, 0.95),
            "latencies_s": lat,
            "artifacts": str(cs.artifacts),
        }
    finally:
        cs.teardown()


def _peer(result: Any) -> dict[str, Any]:
    s = result.summary()
    return {"status": s["status"], "n": s["ok"], "p50_s": s["p50_s"], "p95_s": s["p95_s"], "note": s["note"]}


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    n = args.latency_n
    out: dict[str, Any] = {"n": n, "settings": "shipped defaults (no bench overrides)"}
    t0 = time.monotonic()
    out["certqueue postgresql+redis"] = _certqueue(n, "postgres", args.case_timeout, args.stall)
    out["certqueue embedded (sqlite, filesystem broker)"] = _certqueue(
        n, "sqlite", args.case_timeout, args.stall
    )
    out["certbot"] = _peer(peers.run_certbot(n, budget=args.case_timeout, prefix=f"lc{secrets.token_hex(2)}"))
    out["lego"] = _peer(
        peers.run_lego(n, parallel=1, budget=args.case_timeout, prefix=f"ll{secrets.token_hex(2)}")
    )
    out["elapsed_s"] = time.monotonic() - t0
    return out
