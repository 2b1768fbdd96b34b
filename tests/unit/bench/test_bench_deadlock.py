"""A run whose Pebble deadlocked is told apart from a slow certqueue and run again.

Pebble 2.4.0's memory store can deadlock under load (TEST-SERVERS.md): the bench's stall snapshot
dumps its goroutines (SIGQUIT), and nearly all of them then wait on a mutex. Such a run measures
the test CA's bug, so the harness keeps it apart (``discarded_runs``) and runs the contender again.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from bench import cli, diag
from bench.cases import Contender
from bench.report import CaseResult, RunReport

DATA = Path(__file__).parent / "data"


def test_a_real_deadlock_dump_is_recognised() -> None:
    """The head of the dump taken in a stalled run on 2026-12-04 (70 of 80 goroutines in
    semacquire: the store's read lock held by FindValidAuthorization, AddOrder waiting to write)."""
    summary = diag.goroutine_summary((DATA / "pebble-deadlock-goroutines.txt").read_text())
    assert summary["goroutines"] == 80 and summary["by_state"]["semacquire"] == 70
    assert diag.pebble_deadlocked(summary)


@pytest.mark.parametrize(
    "summary",
    [
        None,
        {},
        {"goroutines": 18, "by_state": {"IO wait": 10, "semacquire": 8}},  # an idle Pebble
        {"goroutines": 200, "by_state": {"IO wait": 120, "semacquire": 80}},  # busy, not stuck
        {"goroutines": 40, "by_state": {"semacquire": 40}},  # too few to say
    ],
)
def test_an_idle_or_busy_pebble_is_not_a_deadlock(summary: dict[str, Any] | None) -> None:
    assert not diag.pebble_deadlocked(summary)


def _run(
    stuck_runs: list[bool], reps: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[RunReport, int]:
    """``cli.run`` over one fake contender whose runs deadlock as ``stuck_runs`` says (the last
    value repeats): the report, and how many runs were made."""
    calls: list[int] = []

    def run_once() -> CaseResult:
        stuck = stuck_runs[min(len(calls), len(stuck_runs) - 1)]
        calls.append(1)
        r = CaseResult(name="certqueue 2x4", group="http-01", n=10, ok=3 if stuck else 10)
        r.status = "stalled" if stuck else "ok"
        r.wall_s = 1.0
        r.extra["pebble_deadlock"] = stuck
        return r

    from bench import cases

    monkeypatch.setattr(
        cases, "contenders", lambda args: [Contender("certqueue 2x4", "http-01", 10, run_once)]
    )
    monkeypatch.setattr(diag, "ROOT", tmp_path)
    sizes = {"n": 10, "dns_n": 1, "latency_n": 1, "scan_rows": 1, "storm": 1}
    args = argparse.Namespace(
        case_list=["issue"], layouts=[(2, 4)], cq_env_map={}, reps=reps, out=None, **sizes
    )
    return cli.run(args), len(calls)


def test_a_deadlocked_run_is_kept_apart_and_run_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # round 1 deadlocks, its rerun and round 2 do not
    report, calls = _run([True, False, False], 2, monkeypatch, tmp_path)
    assert calls == 3
    assert [c.status for c in report.cases] == ["ok", "ok"] and [c.rep for c in report.cases] == [0, 1]
    (gone,) = report.discarded
    assert gone.status == "stalled" and gone.rep == 0
    out = report.to_json()
    assert out["cases"][0]["status"] == "ok" and out["cases"][0]["repetitions"] == 2
    assert [d["rep"] for d in out["discarded_runs"]] == [0]


def test_a_run_that_deadlocks_every_time_is_reported_as_stalled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """After DEADLOCK_RERUNS more tries the last run stands, stalled: the table never hides it."""
    report, calls = _run([True], 1, monkeypatch, tmp_path)
    assert calls == 1 + cli.DEADLOCK_RERUNS
    assert [c.status for c in report.cases] == ["stalled"]
    assert len(report.discarded) == cli.DEADLOCK_RERUNS
