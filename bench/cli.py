"""``python -m bench [options]``: run the benchmark cases, print the table, write the JSON.

Cases (``--cases``, comma separated; all by default):

* ``issue``: certqueue's full pipeline over HTTP-01 (PostgreSQL, Redis, real worker pools), with the
  profile of where its time goes (per task type: queue wait, run time, SQL, ACME HTTP);
* ``bare``: the bare ``acme`` library, 1x1, 1x8, 2x8 and certqueue's own concurrency;
* ``certbot``, ``lego``: the peers, each against a fresh Pebble;
* ``storm``: a renewal storm (``--storm`` certificates made due at once);
* ``scan``: the due-scan at ``--scan-rows`` rows, 1% due;
* ``dns``: DNS-01 wildcard certificates through BIND9, certqueue against lego's rfc2136 provider;
* ``pyspy``: a py-spy profile of one acme worker during a short issuance run.

Every case has a time budget (``--case-timeout``); one that does not finish is reported as stalled.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import RESULTS_DIR, CaseResult, RunReport, render_sections, table

log = logging.getLogger("bench")

ALL_CASES = ("issue", "bare", "certbot", "lego", "dns", "scan", "storm", "pyspy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (issue 60, storm 300, scan 100k rows, peers a few each)",
    )
    ap.add_argument(
        "--cases", default=",".join(ALL_CASES), help="comma-separated subset of: " + ", ".join(ALL_CASES)
    )
    ap.add_argument(
        "-n", "--n", type=int, default=None, help="certificates for certqueue and bare acme (500)"
    )
    ap.add_argument("--certbot-n", type=int, default=None, help="certbot runs (10)")
    ap.add_argument("--lego-n", type=int, default=None, help="sequential lego runs (8)")
    ap.add_argument("--lego-parallel-n", type=int, default=None, help="lego runs, 8 at a time (48)")
    ap.add_argument("--dns-n", type=int, default=None, help="wildcard certificates per DNS-01 case (30)")
    ap.add_argument("--storm", type=int, default=None, help="certificates in the renewal storm (10000)")
    ap.add_argument("--scan-rows", type=int, default=None, help="rows for the due-scan case (1000000)")
    ap.add_argument(
        "--cq-layouts",
        default="1x8,2x4",
        help="acme pool layouts to run, PROCESSESxCHILDREN (celery main processes x prefork children)",
    )
    ap.add_argument(
        "--storm-scan-interval",
        type=float,
        default=None,
        help="shorten beat's scan interval in the storm (seconds; reported; the shipped 60 by default)",
    )
    ap.add_argument(
        "--storm-timeout", type=float, default=5400.0, help="seconds before the storm counts as timed out"
    )
    ap.add_argument("--storm-workers", type=int, default=2, help="acme worker processes in the storm")
    ap.add_argument("--storm-concurrency", type=int, default=4, help="prefork children per storm worker")
    ap.add_argument(
        "--case-timeout", type=float, default=1800.0, help="seconds before a case counts as stalled"
    )
    ap.add_argument(
        "--stall", type=float, default=90.0, help="seconds without progress that count as stalled"
    )
    ap.add_argument(
        "--cq-env",
        action="append",
        default=[],
        metavar="CERTQUEUE_KEY=VALUE",
        help="extra certqueue setting for every stack (repeatable)",
    )
    ap.add_argument("--out", default=None, help="results directory (bench/results)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    quick = args.quick
    defaults = {
        "n": (60, 500),
        "certbot_n": (3, 10),
        "lego_n": (3, 8),
        "lego_parallel_n": (16, 48),
        "dns_n": (8, 30),
        "storm": (300, 10_000),
        "scan_rows": (100_000, 1_000_000),
    }
    for key, (q, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, q if quick else full)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)}")
    args.case_list = cases
    try:
        args.layouts = [
            tuple(int(x) for x in lay.lower().split("x", 1)) for lay in args.cq_layouts.split(",")
        ]
        if any(len(lay) != 2 or min(lay) < 1 for lay in args.layouts):
            raise ValueError
    except ValueError:
        ap.error("--cq-layouts must look like 1x8,2x4")
    args.cq_workers, args.cq_concurrency = args.layouts[0]
    args.cq_env_map = {}
    for item in args.cq_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("CERTQUEUE_"):
            ap.error(f"--cq-env wants CERTQUEUE_KEY=VALUE, not {item!r}")
        args.cq_env_map[key] = value
    return args


def _guard(report: RunReport, name: str, group: str, n: int, fn: Callable[[], Any]) -> Any:
    """Run one case; an exception becomes an ``error`` row instead of ending the run."""
    t0 = time.monotonic()
    log.info("case %s: n=%s", name, n)
    try:
        return fn()
    except Exception as exc:
        log.error("case %s failed: %s", name, exc)
        traceback.print_exc()
        report.cases.append(
            CaseResult(
                name=name,
                group=group,
                n=n,
                status="error",
                note=f"{type(exc).__name__}: {str(exc)[:200]}",
                wall_s=time.monotonic() - t0,
            )
        )
        return None


def run(args: argparse.Namespace) -> RunReport:
    from bench import cases as c
    from bench import env

    env.EXTRA_ENV.update(args.cq_env_map)

    opts = {k: v for k, v in vars(args).items() if k not in ("case_list", "layouts", "cq_env_map")}
    report = RunReport(options=opts)
    from bench import diag

    base = Path(args.out) if args.out else RESULTS_DIR
    diag.ROOT = base / f"{report.stamp}-artifacts"
    todo = args.case_list
    if "issue" in todo:
        _guard(report, "certqueue", "http-01", args.n, lambda: c.case_certqueue_http(report, args))
    if "bare" in todo:
        _guard(report, "bare acme", "http-01", args.n, lambda: c.case_bare(report, args))
    if "certbot" in todo:
        _guard(report, "certbot sequential", "http-01", args.certbot_n, lambda: c.case_certbot(report, args))
    if "lego" in todo:
        _guard(report, "lego", "http-01", args.lego_n, lambda: c.case_lego(report, args))
    if "dns" in todo:
        _guard(report, "dns-01", "dns-01", args.dns_n, lambda: c.case_dns(report, args))
    if "scan" in todo:
        _guard(report, "scan", "scan", args.scan_rows, lambda: c.case_scan(report, args))
    if "storm" in todo:
        _guard(report, "storm", "storm", args.storm, lambda: c.case_storm(report, args))
    if "pyspy" in todo:
        _guard(report, "pyspy", "profile", args.n, lambda: c.case_pyspy(report, args))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    for noisy in ("celery", "kombu", "urllib3", "acme", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = run(args)
    path = report.write(Path(args.out)) if args.out else report.write()
    from bench import diag

    print(f"artifacts (process logs, stall snapshots): {diag.ROOT}")
    print()
    print(table(report))
    print(render_sections(report))
    print(f"\nresults: {path}")
    return 0 if all(c.status in ("ok", "skipped") for c in report.cases) else 1


if __name__ == "__main__":
    sys.exit(main())
