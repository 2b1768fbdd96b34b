"""The harness's statistics (bench/stats.py) and how the report aggregates repetitions."""

from __future__ import annotations

import pytest

from bench.report import CaseResult, RunReport, aggregate
from bench.stats import interleave, per_cert, percentile, ratio, spread


def test_interleave_is_round_robin():
    assert interleave(["a", "b", "c"], 2) == [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (1, "c")]
    assert interleave(["a"], 1) == [(0, "a")]
    with pytest.raises(ValueError):
        interleave(["a"], 0)


def test_spread_median_min_max():
    s = spread([10.0, 12.0, 11.0])
    assert s is not None
    assert (s.median, s.low, s.high, s.n) == (11.0, 10.0, 12.0, 3)
    assert s.relative == pytest.approx(2 / 11)
    # an even count takes the mean of the middle two; a failed repetition (None) is left out
    s2 = spread([1.0, None, 3.0, 5.0, 7.0])
    assert s2 is not None and s2.median == 4.0 and s2.n == 4
    assert spread([None, None]) is None
    assert spread([]) is None
    assert spread([0.0]).relative is None  # type: ignore[union-attr]


def test_ratio_and_per_cert():
    assert ratio(10.0, 2.0) == 5.0
    assert ratio(None, 2.0) is None and ratio(10.0, 0.0) is None
    cpu = per_cert({"client": 4.0, "postgresql": 1.0, "redis": 0.5, "total": 99.0}, 10)
    # total is recomputed from the columns, never taken from the input
    assert cpu == {"client": 0.4, "postgresql": 0.1, "redis": 0.05, "total": pytest.approx(0.55)}
    assert per_cert({"client": 1.0}, 0) == {"client": None, "total": None}


def test_percentile():
    assert percentile([], 0.5) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.95) == 5.0
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def _run(name: str, rep: int, ok: int, wall: float, status: str = "ok") -> CaseResult:
    return CaseResult(
        name=name,
        group="http-01",
        n=10,
        ok=ok,
        wall_s=wall,
        status=status,
        rep=rep,
        cpu_s={"client": ok * 0.1, "pebble": ok * 0.01, "total": ok * 0.11},
        peak_rss_mb={"client": 100.0 + rep},
    )


def test_aggregate_takes_medians_and_the_worst_status():
    runs = [
        _run("certqueue 1x8", 0, 10, 2.0),
        _run("certqueue 1x8", 1, 10, 1.0),
        _run("certqueue 1x8", 2, 10, 4.0),
    ]
    row = aggregate(runs)
    assert row["certs_per_s"] == 5.0  # rates 5, 10, 2.5 -> median 5
    assert row["certs_per_s_spread"]["min"] == 2.5 and row["certs_per_s_spread"]["max"] == 10.0
    assert row["system_cpu_per_cert_s"]["client"] == pytest.approx(0.1)
    assert row["system_cpu_per_cert_s"]["total"] == pytest.approx(0.11)
    assert row["peak_rss_mb"] == {"client": 102.0}
    assert row["status"] == "ok" and row["repetitions"] == 3
    runs.append(_run("certqueue 1x8", 3, 4, 1.0, status="stalled"))
    assert aggregate(runs)["status"] == "stalled"


def test_report_rows_and_ratios_use_medians():
    r = RunReport(options={})
    for rep in range(3):  # interleaved, as the CLI appends them
        r.cases.append(_run("certqueue 1x8", rep, 10, [1.0, 2.0, 0.5][rep]))
        r.cases.append(_run("certbot sequential", rep, 10, [100.0, 50.0, 200.0][rep]))
    rows = r.rows()
    assert [x["name"] for x in rows] == ["certqueue 1x8", "certbot sequential"]
    # certqueue median 10/s, certbot median 0.1/s: the ratio of medians, not best against worst
    assert r.ratios()["http-01"]["certbot sequential"] == pytest.approx(100.0)
    data = r.to_json()
    assert data["cases"][0]["name"] == "certqueue 1x8" and data["cases"][0]["certs_per_s"] == 10.0
    assert len(data["cases"][0]["runs"]) == 3
