"""Smoke test of the benchmark harness: its CLI parses options, its table/JSON writer works on a
fake result, and one ``--quick`` run of a few tiny cases completes and writes valid JSON. Nothing is
timed (speed claims come from ``make bench``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import parse_args
from bench.pyspy import summarise
from bench.report import CaseResult, RunReport, render_sections, table


def test_quick_sizes_and_layouts():
    args = parse_args(["--quick", "--cases", "issue,bare", "--cq-layouts", "1x8,2x4"])
    assert args.case_list == ["issue", "bare"]
    assert args.layouts == [(1, 8), (2, 4)]
    assert (args.cq_workers, args.cq_concurrency) == (1, 8)
    assert args.n == 60 and args.storm == 300 and args.scan_rows == 100_000
    assert args.reps == 1 and args.sequential_n == 3


def test_full_defaults_and_explicit_sizes_win():
    args = parse_args(["--storm", "1234"])
    assert args.storm == 1234
    assert args.n == 500 and args.scan_rows == 1_000_000
    assert "storm" in args.case_list and "scan" in args.case_list
    assert args.reps == 3 and args.sequential_n == 20 and args.renew_n == 40


def test_certqueue_setting_overrides():
    args = parse_args(["--cq-env", "CERTQUEUE_AUTOMATION__MAX_ORDERS_IN_FLIGHT_PER_CA=0"])
    assert args.cq_env_map == {"CERTQUEUE_AUTOMATION__MAX_ORDERS_IN_FLIGHT_PER_CA": "0"}


@pytest.mark.parametrize(
    "bad",
    [
        ["--cases", "nope"],
        ["--cq-layouts", "8"],
        ["--cq-layouts", "0x4"],
        ["--cq-env", "FOO=1"],
        ["--reps", "0"],
    ],
)
def test_bad_options_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_args(bad)


def _fake_report() -> RunReport:
    r = RunReport(options={"n": 4})
    r.cases.append(
        CaseResult(
            name="certqueue 1x8",
            group="http-01",
            n=4,
            ok=4,
            wall_s=2.0,
            latencies_s=[0.5, 0.6, 0.7, 0.8],
            client_cpu_s=0.4,
            pebble_cpu_s=0.1,
        )
    )
    r.cases.append(
        CaseResult(
            name="certqueue 2x4",
            group="http-01",
            n=4,
            ok=4,
            wall_s=1.0,
            latencies_s=[0.5, 0.5, 0.5, 0.5],
            client_cpu_s=0.4,
        )
    )
    r.cases.append(
        CaseResult(
            name="certbot sequential",
            group="http-01",
            n=2,
            ok=2,
            wall_s=10.0,
            latencies_s=[5.0, 5.0],
            client_cpu_s=1.0,
        )
    )
    r.cases.append(CaseResult(name="lego 8 processes", group="http-01", n=8, status="stalled"))
    r.sections["scan"] = {"rows": 10, "explain": "x" * 200, "index_scan_on_state_renew_at": True}
    return r


def test_summary_ratios_and_table():
    r = _fake_report()
    s = r.cases[0].summary()
    assert s["certs_per_s"] == 2.0
    assert s["p50_s"] == pytest.approx(0.65)
    assert s["cpu_per_cert_s"] == pytest.approx(0.1)
    assert "latencies_s" not in s
    # the best certqueue layout (4/s) against certbot (0.2/s); a stalled peer has no ratio
    assert r.ratios()["http-01"]["certbot sequential"] == pytest.approx(20.0)
    assert r.ratios()["http-01"]["lego 8 processes"] is None
    text = table(r)
    assert "| http-01 | certbot sequential | 2 | 1 | ok | 0.20 |" in text
    assert "20.0x" in text and "stalled" in text
    assert "index_scan_on_state_renew_at=True" in render_sections(r)
    assert "xxxx" not in render_sections(r)  # long plans stay in the JSON only


def test_json_written_atomically(tmp_path):
    path = _fake_report().write(tmp_path, stamp="2026-01-01-000000")
    assert path.name == "2026-01-01-000000.json"
    assert not list(tmp_path.glob("*.tmp"))
    data = json.loads(path.read_text())
    assert [c["name"] for c in data["cases"]][:2] == ["certqueue 1x8", "certqueue 2x4"]
    assert data["cases"][2]["certs_per_s"] == pytest.approx(0.2)
    assert data["sections"]["scan"]["explain"] == "x" * 200


def test_pyspy_summary_of_collapsed_stacks():
    collapsed = "\n".join(
        [
            "process 1;main (certqueue/cli.py:1);execute (sqlalchemy/engine/base.py:10);"
            "wait (psycopg/conn.py:5) 6",
            "process 1;main (certqueue/cli.py:1);post (acme/client.py:3);send (ssl.py:9) 3",
            "process 1;main (certqueue/cli.py:1);step (certqueue/tasks/acme.py:7) 1",
        ]
    )
    s = summarise(collapsed)
    assert s["samples"] == 10
    assert s["layers_share"]["database (sqlalchemy/psycopg)"] == pytest.approx(0.6)
    assert s["top_own"][0] == ("wait (psycopg/conn.py:5)", pytest.approx(0.6))
    assert s["top_inclusive_certqueue"][0][0] == "step (certqueue/tasks/acme.py:7)"


ROOT = Path(__file__).resolve().parents[3]


def _quick_run(tmp_path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m bench --quick ARGS`` writing into ``tmp_path``; it must end (0, or 1 for a case
    that is not ok)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            *args,
            "--stall",
            "90",
            "--no-charts",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    return proc


def test_quick_run_completes_and_writes_json(tmp_path):
    """A real ``--quick`` run of tiny cases: it must finish and write JSON with the stable keys.
    Nothing about speed is asserted."""
    proc = _quick_run(
        tmp_path,
        [
            "--cases",
            "bare,storm",
            "-n",
            "4",
            "--sequential-n",
            "2",
            "--storm",
            "6",
            "--storm-scan-interval",
            "2",
        ],
    )
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(files[0].read_text())
    assert {c["name"] for c in data["cases"]} >= {"bare acme 1x1", "bare acme 1x8"}
    for c in data["cases"]:
        assert {"name", "status", "certs_per_s"} <= set(c)
    storm = data["sections"]["storm"]
    for key in (
        "certificates",
        "renewed",
        "elapsed_s",
        "peak_rss_mb_max",
        "certificates_with_more_than_one_order",
        "new_orders_at_ca",
    ):
        assert key in storm
    # every case kept the logs of the processes it started
    artifacts = next(tmp_path.glob("*-artifacts"))
    assert (artifacts / "storm" / "logs" / "pebble.log").exists()
    assert (artifacts / "storm" / "logs" / "beat.log").exists()
    assert (artifacts / "bare-acme-1x8" / "logs" / "pebble.log").exists()


def test_both_intakes_are_contenders_of_their_own():
    from bench.cases import contenders

    args = parse_args(["--quick", "--cases", "issue", "--cq-layouts", "2x4"])
    assert args.cq_intake == "both"
    assert [c.name for c in contenders(args)] == ["certqueue 2x4", "certqueue 2x4 bulk intake"]
    args = parse_args(["--quick", "--cases", "issue", "--cq-layouts", "2x4", "--cq-intake", "tasks"])
    assert [c.name for c in contenders(args)] == ["certqueue 2x4"]


def test_the_bulk_intake_case_issues_every_certificate(tmp_path):
    """certqueue's HTTP-01 case with the bulk API's intake (rows and intents in one transaction,
    no certqueue.issue task): every certificate is issued. Nothing about speed is asserted."""
    proc = _quick_run(tmp_path, ["--cases", "issue", "--cq-intake", "bulk", "--cq-layouts", "1x2", "-n", "6"])
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    (case,) = data["cases"]
    assert case["name"] == "certqueue 1x2 bulk intake"
    assert (case["status"], case["ok"], case["n"]) == ("ok", [6], 6), proc.stdout[-2000:]
    assert case["runs"][0]["extra"]["orders"] == 6  # one order per certificate


def test_the_scan_case_runs_against_the_current_pipeline():
    """The due-scan case imports the pipeline's own claim and message shapes: a rename there must
    fail here, not in a two-hour ``make bench`` (the full run of 2026-12-02 met exactly that).
    A few thousand rows; the timings it reports are not looked at."""
    from bench.scan import run_scan

    out = run_scan(2000, repeats=1)
    assert out["due"] == 20  # 1% of the rows are ACTIVE and due (bench/scan.py FILL_SQL)
    assert out["enqueued"] == 20 and out["messages"] >= 1
    assert out["queue_depth_after"] == out["messages"]
    assert out["index_scan_on_state_renew_at"] in (True, False) and out["explain"]
