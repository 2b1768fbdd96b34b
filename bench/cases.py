"""The benchmark cases; each appends its rows to the report (and its sections). See :mod:`bench.cli`."""

from __future__ import annotations

import argparse
import logging
import secrets

from bench import peers
from bench.cq_issue import run_certqueue
from bench.env import build_stack
from bench.report import RunReport

log = logging.getLogger("bench")


def _tag() -> str:
    return secrets.token_hex(3)


def case_certqueue_http(report: RunReport, args: argparse.Namespace) -> None:
    for k, (procs, children) in enumerate(args.layouts):
        cs = build_stack(instrument=True)
        try:
            cs.start_workers("acme", procs, children)
            tag = _tag()
            result, profile = run_certqueue(
                cs,
                name=f"certqueue {procs}x{children}",
                group="http-01",
                n=args.n,
                domains_for=lambda i, tag=tag: [f"cq{tag}-{i}.bench.test"],
                request_kw={},
                warmup=procs * children,
                timeout=args.case_timeout,
                stall=args.stall,
            )
            result.note = (
                "full pipeline: PostgreSQL + Redis, prefork acme pool "
                f"({procs} worker processes x {children} children), http01 responder, instrumented"
            )
            report.cases.append(result)
            report.sections["profile" if k == 0 else f"profile_{procs}x{children}"] = profile
            report.sections.setdefault("profile", profile)
        finally:
            cs.teardown()


def case_bare(report: RunReport, args: argparse.Namespace) -> None:
    configs = [(1, 1), (1, 8), (2, 8)]
    for same in args.layouts:  # certqueue's own total concurrency
        if same not in configs:
            configs.append(same)
    for procs, threads in configs:
        n = min(args.n, 60) if (procs, threads) == (1, 1) else args.n
        report.cases.append(
            peers.run_bare(
                n, processes=procs, threads=threads, budget=args.case_timeout, prefix=f"bare{_tag()}"
            )
        )


def case_certbot(report: RunReport, args: argparse.Namespace) -> None:
    report.cases.append(peers.run_certbot(args.certbot_n, budget=args.case_timeout, prefix=f"cb{_tag()}"))


def case_lego(report: RunReport, args: argparse.Namespace) -> None:
    report.cases.append(
        peers.run_lego(args.lego_n, parallel=1, budget=args.case_timeout, prefix=f"lg{_tag()}")
    )
    report.cases.append(
        peers.run_lego(args.lego_parallel_n, parallel=8, budget=args.case_timeout, prefix=f"lp{_tag()}")
    )


def case_dns(report: RunReport, args: argparse.Namespace) -> None:
    from bench.dns01 import run_dns

    run_dns(report, args)


def case_scan(report: RunReport, args: argparse.Namespace) -> None:
    from bench.scan import run_scan

    report.sections["scan"] = run_scan(args.scan_rows)


def case_storm(report: RunReport, args: argparse.Namespace) -> None:
    from bench.storm import run_storm

    report.sections["storm"] = run_storm(args)


def case_pyspy(report: RunReport, args: argparse.Namespace) -> None:
    from bench.pyspy import run_pyspy

    report.sections["pyspy"] = run_pyspy(args)
