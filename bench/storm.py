"""The renewal storm: ``--storm`` ACTIVE certificates, all due at once, renewed through Pebble.

The starting certificates are written straight into the database (one throwaway CA made in-process
signs a leaf per certificate; one leaf key is shared by all of them and stored encrypted per row
with its row-bound associated data), so the storm measures renewals only. The bench then plays beat:
it sends ``certqueue.scan.due`` every ``SCAN_EVERY`` seconds, each claiming up to
``automation.scan_batch_size`` rows. Workers are real acme pools (``--storm-workers`` x
``--storm-concurrency``).

Reported: time until every certificate is ACTIVE with a new issuance, renewals per 10 s bucket, the
peak depth of the ``acme`` queue (``LLEN`` summed over kombu's priority lists), the peak RSS (VmHWM)
of every worker process, the ACME orders created (must equal the number of certificates) and any
certificate with more than one.

``--storm-profile`` makes the run a profile instead (its timing is not the storm's throughput): the
workers are instrumented (SQL statements, commits and HTTP requests counted per process, see
``bench/instrument``) and ``py-spy record`` samples every worker tree (``--subprocesses``,
``--nonblocking``, ``--rate`` 50) for the whole storm; the JSON gets ``profile`` with the per-renewal
counts and the py-spy summary (top functions, layers, certqueue's steps inclusive).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis as redis_lib
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, insert, select, text

from bench.diag import pyspy_binary, stall_snapshot
from bench.env import CertqueueStack, build_stack, read_instrument
from bench.procs import SystemMeter, descendants, vm_hwm_mb
from certqueue.brokerstate import KOMBU_PRIORITY_SEP, KOMBU_PRIORITY_STEPS

log = logging.getLogger("bench")

#: the acme queue's Redis lists, one per kombu priority step
ACME_LISTS = ["acme" if p == 0 else f"acme{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def seed_active(cs: CertqueueStack, n: int, tag: str) -> tuple[int, float]:
    """Insert ``n`` ACTIVE certificates due now; returns (highest starting issuance id, seconds)."""
    from certqueue import certificates
    from certqueue.db import session_scope
    from certqueue.models import Certificate, Issuance, State

    t0 = time.monotonic()
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("certqueue bench throwaway CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=60))
        .not_valid_after(now + dt.timedelta(days=400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ks = certificates.keystore()
    directory = cs.directory_url
    email = "bench@example.test"
    cert_rows: list[dict[str, Any]] = []
    iss_rows: list[dict[str, Any]] = []
    for i in range(n):
        cid = f"cert_storm{tag}{i:07d}"
        domain = f"s{tag}-{i}.bench.test"
        serial = x509.random_serial_number()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(domain))
            .issuer_name(ca_name)
            .public_key(leaf_key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(days=60))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        der = leaf.public_bytes(serialization.Encoding.DER)
        fp = hashlib.sha256(der).hexdigest()
        cert_rows.append(
            {
                "id": cid,
                "domains": [domain],
                "dedupe_key": hashlib.sha256(f"{domain}\nec256\n{directory}".encode()).hexdigest(),
                "state": State.ACTIVE,
                "key_type": "ec256",
                "challenge_type": "http-01",
                "challenge_map": {},
                "directory_url": directory,
                "email": email,
                "targets": [],
                "auto_renew": True,
                "renew_at": now - dt.timedelta(seconds=1),
                "created_at": now,
                "updated_at": now,
            }
        )
        iss_rows.append(
            {
                "certificate_id": cid,
                "serial": format(serial, "x"),
                "not_before": now - dt.timedelta(days=60),
                "not_after": now + dt.timedelta(days=30),
                "cert_pem": leaf.public_bytes(serialization.Encoding.PEM).decode(),
                "chain_pem": ca_pem,
                "key_enc": ks.encrypt(leaf_pem, certificates.issuance_aad(cid, fp)),
                "key_type": "ec256",
                "fingerprint": fp,
                "issuer": "CN=certqueue bench throwaway CA",
                "created_at": now,
            }
        )
    with session_scope() as s:
        for i in range(0, n, 2000):
            s.execute(insert(Certificate), cert_rows[i : i + 2000])
            s.execute(insert(Issuance), iss_rows[i : i + 2000])
        s.execute(
            text(
                "UPDATE certificates c SET current_issuance_id = i.id FROM issuances i "
                "WHERE i.certificate_id = c.id AND c.current_issuance_id IS NULL"
            )
        )
        top = int(s.execute(select(func.max(Issuance.id))).scalar_one())
    with session_scope() as s:
        s.execute(text("ANALYZE certificates"))
    return top, time.monotonic() - t0


def _progress(top: int) -> tuple[int, int]:
    """(renewed: ACTIVE with a new issuance, in flight: RENEWING) in one read."""
    from certqueue.db import session_scope

    with session_scope(write=False) as s:
        row = s.execute(
            text(
                "SELECT count(*) FILTER (WHERE state = 'ACTIVE' AND current_issuance_id > :top), "
                "count(*) FILTER (WHERE state = 'RENEWING') FROM certificates"
            ),
            {"top": top},
        ).one()
    return int(row[0]), int(row[1])


_TASK_LINE = re.compile(r"Task (certqueue[\w.]*)\[[^\]]*\] (received|succeeded|retry|raised)")


def task_outcomes(log_dir: Path) -> dict[str, dict[str, int]]:
    """Executions per task name and outcome, read from the workers' own INFO log lines (Celery logs
    every received, succeeded and retried task): no event consumer needed during the storm."""
    out: dict[str, dict[str, int]] = {}
    for f in log_dir.glob("bench-*.log"):
        with open(f, errors="replace") as fh:
            for line in fh:
                m = _TASK_LINE.search(line)
                if m:
                    d = out.setdefault(m.group(1), {})
                    d[m.group(2)] = d.get(m.group(2), 0) + 1
    return out


def live_probe(cs: CertqueueStack, t: float) -> dict[str, Any]:
    """A look during the run that disturbs nothing: orders by status in the database and at the CA
    (who is each open order waiting on?), the queue depths."""
    from bench.diag import ca_order_status, db_state, redis_depths

    probe: dict[str, Any] = {"t_s": t}
    for key, fn in (
        ("orders_by_status", lambda: db_state(cs.db_url)["orders_by_status"]),
        ("queues", lambda: redis_depths(cs.redis.url)),
        ("ca_orders", lambda: ca_order_status(cs, limit=100, timeout=30)),
    ):
        try:
            probe[key] = fn()
        except Exception as exc:
            probe[key] = f"failed: {type(exc).__name__}"
    return probe


def start_profilers(
    cs: CertqueueStack, dest: Path, rate: int = 50
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """``py-spy record`` of every worker tree (raw collapsed stacks into ``dest``)."""
    spy = pyspy_binary()
    if spy is None:
        raise RuntimeError("--storm-profile needs py-spy (pip install py-spy)")
    dest.mkdir(parents=True, exist_ok=True)
    spies = []
    for root in cs.worker_pids():
        out = dest / f"pyspy-record-{root}.txt"
        argv = [str(spy), "record", "--pid", str(root), "--subprocesses", "--nonblocking"]
        argv += ["--rate", str(rate), "--format", "raw", "--output", str(out)]
        with open(dest / f"pyspy-record-{root}.log", "wb") as err:
            proc = subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
        spies.append((proc, out))
    return spies


def stop_profilers(spies: list[tuple[subprocess.Popen[bytes], Path]]) -> dict[str, Any]:
    """Stop the recorders (SIGINT makes py-spy write its file) and summarise all their samples."""
    from bench.pyspy import summarise

    texts = []
    for proc, out in spies:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if out.exists():
            texts.append(out.read_text(errors="replace"))
    if not texts:
        return {"status": "error", "note": "py-spy wrote no samples (see pyspy-record-*.log)"}
    summary = summarise("\n".join(texts), top=25)
    summary["files"] = [str(out) for _, out in spies]
    return summary


def profile_counts(instr: dict[str, dict[str, Any]], renewed: int) -> dict[str, Any]:
    """Per renewal: SQL statements, commits, HTTP requests and task executions, in all and per task
    name (``-`` is work done outside a task's own thread, e.g. ``issue_batch``'s thread pool)."""
    keys = ("sql_n", "commit_n", "http_n", "task_n")
    total = {k: sum(int(c.get(k, 0)) for c in instr.values()) for k in keys}
    per_task = {
        name: {k: round(int(c.get(k, 0)) / renewed, 2) for k in keys if c.get(k)}
        for name, c in sorted(instr.items())
        if renewed
    }
    return {
        "sql_statements_per_renewal": round(total["sql_n"] / renewed, 2) if renewed else None,
        "commits_per_renewal": round(total["commit_n"] / renewed, 2) if renewed else None,
        "http_requests_per_renewal": round(total["http_n"] / renewed, 2) if renewed else None,
        "sql_s_per_renewal": round(sum(float(c.get("sql_s", 0)) for c in instr.values()) / renewed, 4)
        if renewed
        else None,
        "per_task_per_renewal": per_task,
        "totals": total,
    }


def run_storm(args: argparse.Namespace) -> dict[str, Any]:
    import secrets

    from certqueue.db import session_scope

    n = args.storm
    scan_every = getattr(args, "storm_scan_interval", None)
    extra_env = {}
    if scan_every:
        extra_env["CERTQUEUE_AUTOMATION__SCAN_INTERVAL_SECONDS"] = str(scan_every)
    out: dict[str, Any] = {
        "certificates": n,
        "workers": args.storm_workers,
        "concurrency": args.storm_concurrency,
        "beat": "real beat, shipped schedule"
        + (f" except scan_interval_seconds={scan_every} (--storm-scan-interval)" if scan_every else ""),
    }
    profile = bool(getattr(args, "storm_profile", False))
    if profile:
        out["profiled"] = "instrumented + py-spy: a profile, not the storm's throughput"
    guard = not getattr(args, "storm_no_guard", False)
    out["ca_guard"] = (
        "counting proxy keeps newOrder and authz fetches from overlapping at Pebble (its 2.4.0 deadlock)"
        if guard
        else "none (--storm-no-guard): Pebble 2.4.0 can deadlock"
    )
    cs = build_stack(
        instrument=profile,
        case="storm",
        counting_proxy=True,
        guard_pebble_deadlock=guard,
        extra_env=extra_env,
    )
    spies: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        out["artifacts"] = str(cs.artifacts)
        top, seed_s = seed_active(cs, n, secrets.token_hex(2))
        out["seed_s"] = seed_s
        from certqueue.config import get_settings

        auto = get_settings().automation
        out["settings"] = {
            "scan_interval_seconds": auto.scan_interval_seconds,
            "scan_batch_size": auto.scan_batch_size,
            "max_queue_depth": auto.max_queue_depth,
            "max_orders_in_flight_per_ca": auto.max_orders_in_flight_per_ca,
            "stuck_after_seconds": auto.stuck_after_seconds,
            "order_timeout_seconds": auto.order_timeout_seconds,
        }
        cs.start_workers("acme", args.storm_workers, args.storm_concurrency)
        if profile:
            spies = start_profilers(cs, (cs.artifacts or cs.workdir) / "profile")
        r = redis_lib.Redis.from_url(cs.redis.url, socket_timeout=5)
        counts0 = cs.proxy.counts() if cs.proxy else {}
        meter = SystemMeter(cs)
        meter.start()
        out["loadavg_before"] = os.getloadavg()
        t0 = time.monotonic()
        cs.stack.start_beat()
        deadline = t0 + getattr(args, "storm_timeout", args.case_timeout)
        peak_q = 0
        hwm: dict[int, float] = {}
        timeline: list[tuple[float, int, int, int]] = []
        done = 0
        last_progress, last_done = t0, -1
        status = "ok"
        probe_every = getattr(args, "storm_probe_every", 0) or 0
        next_probe = t0 + probe_every if probe_every else float("inf")
        probes: list[dict[str, Any]] = []
        while True:
            now = time.monotonic()
            if now >= next_probe:
                probes.append(live_probe(cs, round(now - t0, 1)))
                next_probe = now + probe_every
            # kombu keeps one list per priority step (new orders go at NEW_WORK_PRIORITY): all of them
            q = sum(int(r.llen(k)) for k in ACME_LISTS)
            peak_q = max(peak_q, q)
            for root in cs.worker_pids():
                for pid in descendants(root):
                    m = vm_hwm_mb(pid)
                    if m is not None:
                        hwm[pid] = max(hwm.get(pid, 0.0), m)
            done, in_flight = _progress(top)
            timeline.append((round(now - t0, 1), done, in_flight, q))
            if done >= n:
                break
            if done != last_done:
                last_done, last_progress = done, now
            if now - last_progress > args.stall:
                status = "stalled"
                break
            if now > deadline:
                status = "timeout"
                break
            time.sleep(2.0)
        elapsed = time.monotonic() - t0
        out["loadavg_after"] = os.getloadavg()
        if spies:
            out["pyspy"] = stop_profilers(spies)
            spies = []
        cpu = meter.stop()
        if status != "ok" and cs.artifacts is not None:
            log.warning("storm %s at %d/%d: taking the stall snapshot in %s", status, done, n, cs.artifacts)
            snap = stall_snapshot(
                cs, cs.artifacts, why=f"{status}: {done}/{n} renewed, none for {args.stall}s"
            )
            out["stall_snapshot"] = {
                k: snap.get(k) for k in ("db", "queues", "ca_orders", "pebble_goroutines", "processes_alive")
            }
        out.update(
            status=status,
            renewed=done,
            elapsed_s=elapsed,
            rate_per_s=done / elapsed if elapsed else None,
            peak_queue_depth=peak_q,
            cpu_s=cpu,
        )
        out["client_cpu_s"] = cpu.get("client")
        out["pebble_cpu_s"] = cpu.get("pebble")
        out["cpu_per_cert_s"] = {k: v / done for k, v in cpu.items()} if done else None
        out["peak_rss_mb_per_process"] = {str(k): round(v, 1) for k, v in sorted(hwm.items())}
        out["peak_rss_mb_max"] = max(hwm.values()) if hwm else None
        buckets: dict[int, int] = {}
        prev = 0
        for t, d, _f, _q in timeline:
            b = int(t // 10) * 10
            buckets[b] = buckets.get(b, 0) + (d - prev)
            prev = d
        out["renewals_per_10s"] = buckets
        out["probes"] = probes
        out["timeline_columns"] = ["t_s", "renewed", "in_flight", "acme_queue"]
        out["timeline"] = timeline[:: max(1, len(timeline) // 300)]
        with session_scope(write=False) as s:
            orders = int(s.execute(text("SELECT count(*) FROM orders")).scalar_one())
            dups = int(
                s.execute(
                    text(
                        "SELECT count(*) FROM (SELECT certificate_id FROM orders GROUP BY certificate_id "
                        "HAVING count(*) > 1) d"
                    )
                ).scalar_one()
            )
            states: dict[str, int] = dict(
                s.execute(text("SELECT state, count(*) FROM certificates GROUP BY state")).all()
            )
        out.update(orders=orders, certificates_with_more_than_one_order=dups, states_at_end=states)
        cs.stop_workers()
        if profile and done:
            out["profile"] = profile_counts(read_instrument(cs.instrument_dir), done)
        outcomes = task_outcomes(cs.workdir / "logs")
        out["task_outcomes"] = outcomes
        if done:
            out["executions_per_renewal"] = {
                name: round(sum(v for k, v in c.items() if k != "received") / done, 2)
                for name, c in sorted(outcomes.items())
            }
        if cs.proxy is not None and cs.proxy.proc.poll() is None:
            counts = cs.proxy.counts()
            out["new_orders_at_ca"] = counts.get("newOrder 201", 0) - counts0.get("newOrder 201", 0)
            out["requests_at_ca"] = {k: v - counts0.get(k, 0) for k, v in sorted(counts.items())}
        out["targets"] = {
            "under_10_min": status == "ok" and elapsed < 600,
            "orders_equal_certificates": orders == n,
            "new_orders_at_ca_equal_certificates": out.get("new_orders_at_ca") == n,
            "under_300_mb_per_process": (out["peak_rss_mb_max"] or 0) < 300,
        }
        return out
    finally:
        for proc, _ in spies:
            if proc.poll() is None:
                proc.kill()
        cs.teardown()
