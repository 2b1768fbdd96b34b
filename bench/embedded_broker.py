"""``python -m bench.embedded_broker``: the embedded broker candidates, measured on this machine.

Candidates (kombu level, no Celery, so the transport is what is measured):
- ``certqueue``: certqueue.embedded_broker (write under tmp/, fsync, rename into place)
- ``certqueue-nofsync``: the same without the fsync
- ``kombu-fs``: kombu's own filesystem transport (the one issue 19 replaced)
- ``sqla-sqlite``: kombu's SQLAlchemy transport on a SQLite file

Every candidate polls an empty queue every 0.1 s (the embedded default's setting). Each run
starts ``--producers`` processes that publish ``--messages`` messages between them as fast as they
can (or one every ``--interval`` seconds: latency at a light load), while ``--consumers``
processes drain the queue. Every message carries its id and the time it was published. Reported
per candidate: wall time until the last message was consumed, messages per second,
publish-to-receive latency (p50, p95, max), and the correctness counts: duplicates, lost, decoded
empty or wrong, and consumer processes that died of an exception.

Results are printed and written as JSON to ``bench/results/embedded-broker-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from queue import Empty
from typing import Any

CANDIDATES = ("certqueue", "certqueue-nofsync", "kombu-fs", "sqla-sqlite")
QUEUE = "bench"


def _connection_args(candidate: str, work: Path) -> tuple[str, dict[str, Any]]:
    if candidate.startswith("certqueue"):
        # exactly what the embedded default configures (the stress test relies on this)
        from certqueue.celery_app import broker_urls
        from certqueue.config import BrokerSettings, Settings

        url, _backend, opts = broker_urls(Settings(broker=BrokerSettings(filesystem_path=work)))
        return url, {**opts, "fsync": candidate == "certqueue"}
    if candidate == "kombu-fs":
        (work / "out").mkdir(parents=True, exist_ok=True)
        return "filesystem://", {
            "data_folder_in": str(work / "out"),
            "data_folder_out": str(work / "out"),
            "control_folder": str(work / "control"),
            "polling_interval": 0.1,
        }
    if candidate == "sqla-sqlite":
        # its options go to create_engine: the polling interval is set on the transport (_open)
        return f"sqla+sqlite:///{work / 'broker.db'}", {}
    raise SystemExit(f"unknown candidate {candidate!r}; choose from {', '.join(CANDIDATES)}")


def _open(candidate: str, work: Path) -> Any:
    from kombu import Connection

    url, opts = _connection_args(candidate, work)
    conn = Connection(url, transport_options=opts)
    conn.transport.polling_interval = 0.1  # the embedded default's
    return conn


def _producer(candidate: str, work: str, start: int, count: int, interval: float, errors: Any) -> None:
    try:
        with _open(candidate, Path(work)) as conn:
            producer = conn.Producer(serializer="json")
            for i in range(start, start + count):
                producer.publish({"id": i, "sent": time.time()}, routing_key=QUEUE, retry=True)
                if interval:
                    time.sleep(interval)
    except Exception:
        errors.put(("producer", traceback.format_exc(limit=3)))


def _consumer(candidate: str, work: str, out: str, stop_at: float, expected: int, errors: Any) -> None:
    from kombu import Queue

    seen: list[tuple[Any, float, float]] = []
    try:
        with _open(candidate, Path(work)) as conn:
            queue = Queue(QUEUE, routing_key=QUEUE)

            def on_message(body: Any, message: Any) -> None:
                sent = body.get("sent", 0.0) if isinstance(body, dict) else 0.0
                seen.append((body.get("id") if isinstance(body, dict) else None, float(sent), time.time()))
                message.ack()

            with conn.Consumer(queue, callbacks=[on_message], accept=["json"]):
                idle_since = None
                while time.time() < stop_at:
                    try:
                        conn.drain_events(timeout=0.2)
                        idle_since = None
                    except (TimeoutError, OSError, Empty):
                        # idle: stop once the whole run is consumed and nothing came for a while
                        idle_since = idle_since or time.time()
                        done = Path(out).parent / "done"
                        if done.exists() and time.time() - idle_since > 1.0:
                            break
    except Exception:
        errors.put(("consumer", traceback.format_exc(limit=5)))
    finally:
        Path(out).write_text(json.dumps(seen))


def run(
    candidate: str,
    *,
    producers: int,
    consumers: int,
    messages: int,
    timeout: float,
    interval: float = 0.0,
) -> dict[str, Any]:
    """One run; ``interval`` seconds between one producer's messages (0: as fast as it can)."""
    ctx = mp.get_context("spawn")
    errors: Any = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix=f"cq-bench-{candidate}-") as tmp:
        work = Path(tmp) / "broker"
        work.mkdir()
        _connection_args(candidate, work)  # folders exist before any process starts
        if candidate == "sqla-sqlite":  # create the tables once, as a deployment would
            with _open(candidate, work) as conn:
                conn.SimpleQueue(QUEUE).close()
        outs = [Path(tmp) / f"consumer-{n}.json" for n in range(consumers)]
        stop_at = time.time() + timeout
        cons = [
            ctx.Process(target=_consumer, args=(candidate, str(work), str(o), stop_at, messages, errors))
            for o in outs
        ]
        for p in cons:
            p.start()
        time.sleep(1.0)  # consumers polling before the first message
        per = messages // producers
        counts = [per] * (producers - 1) + [messages - per * (producers - 1)]
        t0 = time.time()
        prods = [
            ctx.Process(
                target=_producer,
                args=(candidate, str(work), n * per, counts[n], interval, errors),
            )
            for n in range(producers)
        ]
        for p in prods:
            p.start()
        for p in prods:
            p.join(timeout)
        published = time.time()
        (Path(tmp) / "done").touch()
        for p in cons:
            p.join(max(1.0, stop_at - time.time() + 5))
        died = sum(1 for p in cons if p.exitcode not in (0, None))
        for p in cons:
            if p.is_alive():
                p.kill()
        records: list[tuple[Any, float, float]] = []
        for o in outs:
            if o.exists():
                records += [tuple(r) for r in json.loads(o.read_text())]  # type: ignore[misc]
        errs: list[tuple[str, str]] = []
        while True:
            try:
                errs.append(errors.get_nowait())
            except Empty:
                break
    ids = [r[0] for r in records]
    good = [i for i in ids if isinstance(i, int)]
    latencies = sorted((r[2] - r[1]) * 1000 for r in records if r[1])
    last = max((r[2] for r in records), default=t0)
    result = {
        "candidate": candidate,
        "producers": producers,
        "consumers": consumers,
        "messages": messages,
        "interval": interval,
        "delivered": len(good),
        "duplicates": len(good) - len(set(good)),
        "lost": len(set(range(messages)) - set(good)),
        "decoded_empty_or_wrong": len(ids) - len(good),
        "consumer_exceptions": sum(1 for kind, _ in errs if kind == "consumer"),
        "producer_exceptions": sum(1 for kind, _ in errs if kind == "producer"),
        "consumers_died": died,
        "publish_seconds": round(published - t0, 3),
        "drain_seconds": round(last - t0, 3),
        "messages_per_second": round(len(good) / max(last - t0, 1e-9), 1),
        "latency_ms_p50": round(statistics.median(latencies), 2) if latencies else None,
        "latency_ms_p95": round(latencies[int(len(latencies) * 0.95) - 1], 2) if latencies else None,
        "latency_ms_max": round(latencies[-1], 2) if latencies else None,
        "first_error": _last_error_line(errs[0][1]) if errs else None,
    }
    return result


def _last_error_line(tb: str) -> str:
    """The exception line of a traceback (SQLAlchemy follows its own with the SQL and a link)."""
    lines = [ln for ln in tb.strip().splitlines() if ln and not ln.startswith((" ", "(Background", "[SQL"))]
    return lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--interval", type=float, default=0.0, help="seconds between one producer's messages")
    ap.add_argument("--rounds", type=int, default=1, help="runs per candidate")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    results = []
    for _ in range(args.rounds):
        for cand in args.candidates.split(","):
            r = run(
                cand,
                producers=args.producers,
                consumers=args.consumers,
                messages=args.messages,
                timeout=args.timeout,
                interval=args.interval,
            )
            print(json.dumps(r), flush=True)
            results.append(r)
    if not args.no_save:
        out = Path(__file__).parent / "results" / f"embedded-broker-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
        out.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2) + "\n")
        print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
