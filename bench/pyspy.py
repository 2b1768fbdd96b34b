"""A py-spy profile of certqueue's acme pool while it issues certificates (the slowest part).

py-spy (installed with certbot into ``var/bench-peers/certbot``, not the project's venv) samples the
worker's main process and its prefork children (``--subprocesses``, idle threads excluded) during a
short HTTP-01 run. The collapsed stacks are summarised: the top functions by own samples and by
inclusive samples, and the share of samples per layer (SQLAlchemy/psycopg, ACME/HTTP, Celery/kombu,
cryptography, certqueue's own code), attributed to the innermost frame that belongs to a layer.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import time
from collections import Counter
from typing import Any

from bench import peers
from bench.cq_issue import create_requests, send_issue, wait_all
from bench.env import build_stack

LAYERS = [
    ("database (sqlalchemy/psycopg)", ("sqlalchemy/", "psycopg/", "psycopg_pool")),
    (
        "acme protocol + HTTP (acme/josepy/requests/urllib3/ssl)",
        ("acme/", "josepy/", "requests/", "urllib3/", "ssl.py", "http/client.py", "socket.py"),
    ),
    ("celery/kombu/redis", ("celery/", "kombu/", "redis/", "billiard/", "vine/")),
    ("cryptography", ("cryptography/",)),
    ("certqueue", ("certqueue/",)),
    ("logging", ("logging/",)),
]
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:]*):?(?P<line>\d*)\)$")


def _layer(frame: str) -> str | None:
    for name, marks in LAYERS:
        if any(m in frame for m in marks):
            return name
    return None


def summarise(collapsed: str, top: int = 15) -> dict[str, Any]:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [
            f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        layer = next((lay for f in reversed(frames) if (lay := _layer(f))), "other (python runtime, stdlib)")
        layers[layer] += count
    return {
        "samples": total,
        "layers_share": {k: v / total for k, v in layers.most_common()} if total else {},
        "top_own": [(f, c / total) for f, c in own.most_common(top)] if total else [],
        # inclusive time of certqueue's own functions: which step of the pipeline costs what
        "top_inclusive_certqueue": [
            (f, c / total)
            for f, c in incl.most_common()
            if "certqueue/" in f and "cli.py" not in f and "workers.py" not in f and "<module>" not in f
        ][:top]
        if total
        else [],
    }


def run_pyspy(args: argparse.Namespace) -> dict[str, Any]:
    if not peers.PYSPY.exists():
        why = peers.ensure_certbot()
        if why or not peers.PYSPY.exists():
            return {"status": "skipped", "note": why or "py-spy not installed"}
    n = min(args.n, 300)
    cs = build_stack(instrument=False)
    try:
        cs.start_workers("acme", args.cq_workers, args.cq_concurrency)
        tag = secrets.token_hex(2)
        warm = create_requests([[f"pw{tag}-{i}.bench.test"] for i in range(args.cq_concurrency)])
        send_issue(warm)
        wait_all(warm, timeout=120, stall=60)
        ids = create_requests([[f"py{tag}-{i}.bench.test"] for i in range(n)])
        out_file = cs.workdir / "pyspy.txt"
        pid = cs.worker_pids()[0]
        spy = subprocess.Popen(
            [
                str(peers.PYSPY),
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(out_file),
                "--nonblocking",
                # BENCH_PYSPY_GIL=1: only the thread holding the GIL is sampled (a proxy for
                # Python's CPU time: a thread waiting on a socket or PostgreSQL has released it)
                *(["--gil"] if os.environ.get("BENCH_PYSPY_GIL", "") not in ("", "0") else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        time.sleep(1.5)
        t0 = time.monotonic()
        send_issue(ids)
        done, status, _ = wait_all(ids, timeout=args.case_timeout, stall=args.stall)
        wall = time.monotonic() - t0
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate(timeout=10)
        if not out_file.exists():
            return {"status": "error", "note": (err or b"").decode(errors="replace")[-300:]}
        raw = out_file.read_text()
        if cs.artifacts is not None:
            # the collapsed stacks themselves, for a flame graph or a closer look
            cs.artifacts.mkdir(parents=True, exist_ok=True)
            (cs.artifacts / "pyspy-raw.txt").write_text(raw)
        summary = summarise(raw)
        summary.update(
            status=status,
            certificates=n,
            renewed_or_issued=done,
            wall_s=wall,
            workers=f"{args.cq_workers}x{args.cq_concurrency}",
            profiled_pid=pid,
        )
        return summary
    finally:
        cs.teardown()
