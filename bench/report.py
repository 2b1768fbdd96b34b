"""Results of a benchmark run: one :class:`CaseResult` per throughput case, free-form sections for
the profile, the storm and the scan; the table printed at the end and the JSON written to
``bench/results/<date>.json``."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import per_cert, percentile, ratio, spread

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class CaseResult:
    """One issuance-throughput case (``n`` certificates through one client configuration)."""

    name: str
    group: str  # "http-01" or "dns-01"
    n: int
    status: str = "ok"  # ok | partial | stalled | error | skipped
    ok: int = 0
    wall_s: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    client_cpu_s: float | None = None
    pebble_cpu_s: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    rep: int = 0
    #: whole-system CPU seconds over the timed window, per column (client, postgresql, redis, pebble)
    cpu_s: dict[str, float] = field(default_factory=dict)
    #: peak resident set size (MB) of the largest process, per column
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    loadavg_before: tuple[float, float, float] | None = None
    loadavg_after: tuple[float, float, float] | None = None

    @property
    def certs_per_s(self) -> float | None:
        if not self.ok or not self.wall_s:
            return None
        return self.ok / self.wall_s

    def per_cert(self, value: float | None) -> float | None:
        return value / self.ok if value is not None and self.ok else None

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("latencies_s")
        d.update(
            certs_per_s=self.certs_per_s,
            p50_s=percentile(self.latencies_s, 0.5),
            p95_s=percentile(self.latencies_s, 0.95),
            cpu_per_cert_s=self.per_cert(self.client_cpu_s),
            pebble_cpu_per_cert_s=self.per_cert(self.pebble_cpu_s),
            system_cpu_per_cert_s=per_cert(self.cpu_s, self.ok) if self.cpu_s and self.ok else None,
        )
        return d


_STATUS_ORDER = ("error", "stalled", "timeout", "partial", "skipped", "ok")


def _median(values: list[float | None]) -> float | None:
    sp = spread(values)
    return sp.median if sp else None


def aggregate(runs: list[CaseResult]) -> dict[str, Any]:
    """One row per contender from its repetitions: medians, spread, the worst status."""
    first = runs[0]
    sums = [r.summary() for r in runs]
    rate = spread([s["certs_per_s"] for s in sums])
    status = min(
        (r.status for r in runs), key=lambda st: _STATUS_ORDER.index(st) if st in _STATUS_ORDER else 0
    )
    columns = sorted({k for s in sums for k in (s["system_cpu_per_cert_s"] or {})})
    cpu = {
        k: (sp.median if (sp := spread([(s["system_cpu_per_cert_s"] or {}).get(k) for s in sums])) else None)
        for k in columns
    }
    rss: dict[str, float] = {}
    for r in runs:
        for k, v in r.peak_rss_mb.items():
            rss[k] = max(rss.get(k, 0.0), v)
    lat = [x for r in runs for x in r.latencies_s]
    return {
        "name": first.name,
        "group": first.group,
        "n": first.n,
        "status": status,
        "repetitions": len(runs),
        "ok": [r.ok for r in runs],
        "certs_per_s": rate.median if rate else None,
        "certs_per_s_spread": rate.as_dict() if rate else None,
        "p50_s": percentile(lat, 0.5),
        "p95_s": percentile(lat, 0.95),
        "system_cpu_per_cert_s": cpu or None,
        "cpu_per_cert_s": cpu.get("client") if cpu else _median([s["cpu_per_cert_s"] for s in sums]),
        "pebble_cpu_per_cert_s": cpu.get("pebble")
        if cpu
        else _median([s["pebble_cpu_per_cert_s"] for s in sums]),
        "peak_rss_mb": rss or None,
        "note": first.note,
        "runs": sums,
    }


@dataclass
class RunReport:
    options: dict[str, Any]
    cases: list[CaseResult] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    #: load average before and after each single case (throughput runs keep theirs per repetition)
    loadavg: dict[str, Any] = field(default_factory=dict)
    stamp: str = field(default_factory=lambda: dt.datetime.now().strftime("%Y-%m-%d-%H%M%S"))
    #: runs left out of the table because the test CA deadlocked (each run once more in its place)
    discarded: list[CaseResult] = field(default_factory=list)

    def case(self, name: str) -> CaseResult | None:
        return next((c for c in self.cases if c.name == name), None)

    def rows(self) -> list[dict[str, Any]]:
        """One aggregated row per contender (in the order contenders first ran)."""
        by: dict[str, list[CaseResult]] = {}
        for c in self.cases:
            by.setdefault(c.name, []).append(c)
        return [aggregate(runs) for runs in by.values()]

    def ratios(self, rows: list[dict[str, Any]] | None = None) -> dict[str, dict[str, float | None]]:
        """The best certqueue median rate divided by each contender's median, per challenge group."""
        rows = rows if rows is not None else self.rows()
        out: dict[str, dict[str, float | None]] = {}
        for group in sorted({r["group"] for r in rows}):
            mine = [
                r["certs_per_s"] for r in rows if r["group"] == group and r["name"].startswith("certqueue")
            ]
            mine = [m for m in mine if m]
            if not mine:
                continue
            best = max(mine)
            out[group] = {
                r["name"]: ratio(best, r["certs_per_s"])
                for r in rows
                if r["group"] == group and not r["name"].startswith("certqueue")
            }
        return out

    def to_json(self) -> dict[str, Any]:
        rows = self.rows()
        return {
            "started_at": self.started_at,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": platform.platform(),
            },
            "options": self.options,
            "cases": rows,
            "ratios": self.ratios(rows),
            "sections": self.sections,
            "loadavg": self.loadavg,
            "discarded_runs": [
                {**r.summary(), "rep": r.rep, "why": "Pebble 2.4.0 deadlocked (its goroutine dump)"}
                for r in self.discarded
            ],
        }

    def write(self, directory: Path = RESULTS_DIR, stamp: str | None = None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = stamp or self.stamp
        path = directory / f"{stamp}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False, default=str) + "\n")
        tmp.replace(path)
        return path


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.4f}"
    return str(v)


def table(report: RunReport) -> str:
    """The throughput table (markdown): medians over the repetitions, the spread, whole-system CPU
    per certificate by column, and certqueue's ratio to each contender."""
    rows = report.rows()
    ratios = report.ratios(rows)
    columns = sorted(
        {
            k
            for r in rows
            for k in (r["system_cpu_per_cert_s"] or {})
            if k != "total" and not k.startswith("client:")
        }
    )
    head = ["group", "case", "n", "reps", "status", "certs/s (median)", "spread", "p50 s", "p95 s"]
    head += [f"CPU s/cert {k}" for k in columns] + [
        "CPU s/cert total",
        "peak RSS MB",
        "best certqueue ÷ this",
    ]
    out = [head, ["---"] * len(head)]
    for r in rows:
        sp = r["certs_per_s_spread"] or {}
        cpu = r["system_cpu_per_cert_s"] or {}
        rss = r["peak_rss_mb"] or {}
        ratio_v = ratios.get(r["group"], {}).get(r["name"])
        out.append(
            [
                r["group"],
                r["name"],
                str(r["n"]),
                str(r["repetitions"]),
                r["status"],
                _fmt(r["certs_per_s"]),
                f"{_fmt(sp.get('min'))} to {_fmt(sp.get('max'))}" if sp else "-",
                _fmt(r["p50_s"]),
                _fmt(r["p95_s"]),
                *[_fmt(cpu.get(k), 3) for k in columns],
                _fmt(cpu.get("total"), 3),
                _fmt(rss.get("client"), 0),
                "—" if r["name"].startswith("certqueue") else (f"{ratio_v:.1f}x" if ratio_v else "-"),
            ]
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in out)


def render_sections(report: RunReport) -> str:
    """Short human summaries of the non-throughput sections (the JSON has everything)."""
    lines: list[str] = []
    for r in report.rows():
        detail = {
            k.split(":", 1)[1]: v
            for k, v in (r["system_cpu_per_cert_s"] or {}).items()
            if k.startswith("client:") and v
        }
        if detail:
            lines.append(
                f"\nclient CPU s/cert by process, {r['name']}: "
                + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in sorted(detail.items(), key=lambda kv: -kv[1]))
            )
    prof = report.sections.get("profile")
    if prof:
        lines.append("\nWhere the time goes in certqueue (HTTP-01 case):")
        lines.append(
            "| task | executions | per cert | queue wait p50 s | run mean ms | DB stmts/exec"
            " | DB ms/exec | ACME HTTP/exec | ACME ms/exec |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, t in sorted(prof.get("tasks", {}).items()):
            lines.append(
                f"| {name} | {t.get('executions')} | {_fmt(t.get('per_cert'))}"
                f" | {_fmt(t.get('queue_p50_s'), 3)}"
                f" | {_fmt(t.get('run_mean_ms'), 1)} | {_fmt(t.get('db_statements_per_exec'), 1)}"
                f" | {_fmt(t.get('db_ms_per_exec'), 1)} | {_fmt(t.get('http_calls_per_exec'), 1)}"
                f" | {_fmt(t.get('http_ms_per_exec'), 1)} |"
            )
        per = prof.get("per_cert", {})
        if per:
            lines.append("per certificate: " + ", ".join(f"{k}={_fmt(v)}" for k, v in per.items()))
    for key in ("storm", "scan", "pyspy"):
        sec = report.sections.get(key)
        if sec:
            flat = {
                k: v
                for k, v in sec.items()
                if not isinstance(v, (list, dict)) and not (isinstance(v, str) and len(v) > 60)
            }
            lines.append(f"\n{key}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in flat.items()))
    return "\n".join(lines)
