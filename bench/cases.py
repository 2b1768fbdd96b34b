"""The benchmark cases. Throughput contenders (:func:`contenders`) run interleaved, each repetition
against a fresh Pebble; the other cases (latency, profile, DNS-01, scan, storm, pyspy) run once and
write a section. See :mod:`bench.cli`."""

from __future__ import annotations

import argparse
import functools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from bench import peers
from bench.cq_issue import run_certqueue, run_certqueue_timed
from bench.env import build_stack
from bench.report import CaseResult, RunReport

log = logging.getLogger("bench")


def _tag() -> str:
    return secrets.token_hex(3)


@dataclass(frozen=True)
class Contender:
    name: str
    group: str
    n: int
    run: Callable[[], CaseResult]


def certqueue_http(args: argparse.Namespace, procs: int, children: int, intake: str = "tasks") -> CaseResult:
    name = f"certqueue {procs}x{children}" + (" bulk intake" if intake == "bulk" else "")
    cs = build_stack(instrument=False, case=name)
    try:
        cs.start_workers("acme", procs, children)
        tag = _tag()
        result = run_certqueue_timed(
            cs,
            name=name,
            group="http-01",
            n=args.n,
            domains_for=lambda i, tag=tag: [f"cq{tag}-{i}.bench.test"],
            request_kw={},
            warmup=procs * children,
            timeout=args.case_timeout,
            stall=args.stall,
            intake=intake,
        )
        result.note = (
            "full pipeline: PostgreSQL + Redis, prefork acme pool "
            f"({procs} worker processes x {children} children), http01 responder; uninstrumented, "
            + (
                "rows and issue intents written in one transaction inside the window (the bulk API's way)"
                if intake == "bulk"
                else "one certqueue.issue task per certificate, queue filled before the start barrier"
            )
        )
        return result
    finally:
        cs.teardown()


def _lego_parallel(n: int, parallel: int, budget: float) -> Callable[[], CaseResult]:
    return lambda: peers.run_lego(n, parallel=parallel, budget=budget, prefix=f"lp{_tag()}")


def contenders(args: argparse.Namespace) -> list[Contender]:
    """Every throughput contender the selected cases ask for, in the order of one round."""
    out: list[Contender] = []
    todo = args.case_list
    n, seq = args.n, args.sequential_n
    budget = args.case_timeout
    if "issue" in todo:
        intakes = ["tasks", "bulk"] if args.cq_intake == "both" else [args.cq_intake]
        for procs, children in args.layouts:
            for intake in intakes:
                out.append(
                    Contender(
                        f"certqueue {procs}x{children}" + (" bulk intake" if intake == "bulk" else ""),
                        "http-01",
                        n,
                        functools.partial(certqueue_http, args, procs, children, intake),
                    )
                )
    if "bare" in todo:
        configs = [(1, 1), (1, 8), (2, 8)]
        for same in args.layouts:  # certqueue's own total concurrency
            if same not in configs:
                configs.append(same)
        for procs, threads in configs:
            k = seq if (procs, threads) == (1, 1) else n
            out.append(
                Contender(
                    f"bare acme {procs}x{threads}",
                    "http-01",
                    k,
                    functools.partial(
                        peers.run_bare,
                        k,
                        processes=procs,
                        threads=threads,
                        budget=budget,
                        prefix=f"bare{_tag()}",
                    ),
                )
            )
    if "certbot" in todo:
        out.append(
            Contender(
                "certbot sequential",
                "http-01",
                seq,
                lambda: peers.run_certbot(seq, budget=budget, prefix=f"cb{_tag()}"),
            )
        )
        out.append(
            Contender(
                "certbot 8 parallel",
                "http-01",
                n,
                lambda: peers.run_certbot(n, budget=budget, prefix=f"cp{_tag()}", parallel=8),
            )
        )
        out.append(
            Contender(
                f"certbot renew {args.renew_n} lineages",
                "http-01",
                args.renew_n,
                lambda: peers.run_certbot_renew(args.renew_n, budget=budget, prefix=f"cr{_tag()}"),
            )
        )
    if "lego" in todo:
        out.append(
            Contender(
                "lego sequential",
                "http-01",
                seq,
                lambda: peers.run_lego(seq, parallel=1, budget=budget, prefix=f"lg{_tag()}"),
            )
        )
        for par in (8, 32):
            out.append(Contender(f"lego {par} processes", "http-01", n, _lego_parallel(n, par, budget)))
    return out


def case_profile(report: RunReport, args: argparse.Namespace) -> None:
    """Where certqueue's time goes: an instrumented run (task events, SQL and HTTP counters), kept
    apart from the throughput runs so the instruments cost them nothing."""
    procs, children = args.layouts[0]
    cs = build_stack(instrument=True, case="profile")
    try:
        cs.start_workers("acme", procs, children)
        tag = _tag()
        result, profile = run_certqueue(
            cs,
            name=f"certqueue {procs}x{children} instrumented",
            group="profile",
            n=args.n,
            domains_for=lambda i, tag=tag: [f"pr{tag}-{i}.bench.test"],
            request_kw={},
            warmup=procs * children,
            timeout=args.case_timeout,
            stall=args.stall,
        )
        profile["run"] = result.summary()
        report.sections["profile"] = profile
    finally:
        cs.teardown()


def case_dns(report: RunReport, args: argparse.Namespace) -> None:
    from bench.dns01 import run_dns

    run_dns(report, args)


def case_latency(report: RunReport, args: argparse.Namespace) -> None:
    from bench.latency import run_latency

    report.sections["latency"] = run_latency(args)


def case_scan(report: RunReport, args: argparse.Namespace) -> None:
    from bench.scan import run_scan

    report.sections["scan"] = run_scan(args.scan_rows)


def case_storm(report: RunReport, args: argparse.Namespace) -> None:
    from bench.storm import run_storm

    report.sections["storm"] = run_storm(args)


def case_pyspy(report: RunReport, args: argparse.Namespace) -> None:
    from bench.pyspy import run_pyspy

    report.sections["pyspy"] = run_pyspy(args)
