"""Reproduction of issue 21 (the 10,000 storm "stalls"): capped renewals churn through the acme queue
ahead of the steps that would close the open orders.

``python -m bench.repro_storm_churn [--storm 200] [--cap 10]`` runs a small storm under real beat with
the per-CA in-flight cap lowered so the effect shows at a small size, then prints, from counts and
not from timings:

* ``certqueue.renew`` executions per renewed certificate (Celery's own log lines): every renewal over
  the cap is retried through the same FIFO queue every 5 to 10 s, so this grows with
  queue depth / cap (about 7 at 150 certificates and a cap of 10; 8.4 in the 10,000 storm);
* the live probes' "db X / ca Y" table: the open orders the CA has already validated (``ca ready``)
  or issued (``ca valid``) while certqueue's own row still says pending/processing, i.e. orders
  waiting for certqueue's ``validate`` continuation, which is queued behind the capped renewals.

Exit status 1 while renew executes more than ``--max-per-renewal`` (2) times per renewal: the pipeline
v2 dispatcher (claim only up to free capacity, continuations on their own queue) should bring it to
about 1. Timing is printed but asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench import diag
from bench.cli import parse_args
from bench.env import EXTRA_ENV
from bench.storm import run_storm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.repro_storm_churn")
    ap.add_argument("--storm", type=int, default=200)
    ap.add_argument("--cap", type=int, default=10, help="automation.max_orders_in_flight_per_ca")
    ap.add_argument("--max-per-renewal", type=float, default=2.0)
    own = ap.parse_args(argv)
    args = parse_args(
        ["--cases", "storm", "--storm", str(own.storm), "--storm-scan-interval", "5", "--stall", "180"]
    )
    args.storm_probe_every = 20.0
    EXTRA_ENV["CERTQUEUE_AUTOMATION__MAX_ORDERS_IN_FLIGHT_PER_CA"] = str(own.cap)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    diag.ROOT = None
    out = run_storm(args)
    # every execution of a task that starts (or retries starting) an order, per renewal: the landed
    # pipeline's capped renewals spun through certqueue.renew; pipeline v2 starts them in batches
    # (certqueue.acme.issue_batch, a handful of certificates each) and hands stragglers to
    # certqueue.acme.start
    per_task = out.get("executions_per_renewal") or {}
    starting = [
        per_task.get(t) for t in ("certqueue.renew", "certqueue.acme.start", "certqueue.acme.issue_batch")
    ]
    per = sum(x for x in starting if x is not None) if any(x is not None for x in starting) else None
    summary = {
        "status": out["status"],
        "renewed": out["renewed"],
        "certificates": out["certificates"],
        "cap": own.cap,
        "order_starting_executions_per_renewal": per,
        "executions_per_renewal": per_task,
        "task_outcomes": out.get("task_outcomes"),
        "open_orders_db_vs_ca": [
            {
                "t_s": p["t_s"],
                **(p["ca_orders"].get("db_vs_ca", {}) if isinstance(p["ca_orders"], dict) else {}),
            }
            for p in out.get("probes", [])
        ],
        "elapsed_s (not asserted)": out["elapsed_s"],
        "artifacts": out.get("artifacts"),
    }
    print(json.dumps(summary, indent=2, default=str))
    if per is None or per > own.max_per_renewal:
        print(f"REPRODUCED: renew ran {per} times per renewal (> {own.max_per_renewal})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
