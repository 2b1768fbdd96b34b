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

from bench.procs import percentile

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
        )
        return d


@dataclass
class RunReport:
    options: dict[str, Any]
    cases: list[CaseResult] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    stamp: str = field(default_factory=lambda: dt.datetime.now().strftime("%Y-%m-%d-%H%M%S"))

    def case(self, name: str) -> CaseResult | None:
        return next((c for c in self.cases if c.name == name), None)

    def ratios(self) -> dict[str, dict[str, float | None]]:
        """certqueue's throughput divided by each peer's, per challenge group."""
        out: dict[str, dict[str, float | None]] = {}
        for group in sorted({c.group for c in self.cases}):
            mine_all = [
                c
                for c in self.cases
                if c.group == group and c.name.startswith("certqueue") and c.certs_per_s is not None
            ]
            if not mine_all:
                continue
            mine = max(mine_all, key=lambda c: c.certs_per_s or 0.0)
            best = mine.certs_per_s or 0.0
            out[group] = {
                c.name: (best / c.certs_per_s if c.certs_per_s else None)
                for c in self.cases
                if c.group == group and not c.name.startswith("certqueue")
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": platform.platform(),
            },
            "options": self.options,
            "cases": [c.summary() for c in self.cases],
            "ratios": self.ratios(),
            "sections": self.sections,
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
    """The throughput table (markdown), with certqueue's ratio to each peer."""
    ratios = report.ratios()
    head = [
        "group",
        "case",
        "n",
        "ok",
        "status",
        "certs/s",
        "p50 s",
        "p95 s",
        "client CPU s/cert",
        "Pebble CPU s/cert",
        "best certqueue ÷ this",
    ]
    rows = [head, ["---"] * len(head)]
    for c in report.cases:
        s = c.summary()
        ratio = ratios.get(c.group, {}).get(c.name)
        rows.append(
            [
                c.group,
                c.name,
                str(c.n),
                str(c.ok),
                c.status,
                _fmt(s["certs_per_s"]),
                _fmt(s["p50_s"]),
                _fmt(s["p95_s"]),
                _fmt(s["cpu_per_cert_s"], 3),
                _fmt(s["pebble_cpu_per_cert_s"], 3),
                "—" if c.name.startswith("certqueue") else (f"{ratio:.1f}x" if ratio else "-"),
            ]
        )
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def render_sections(report: RunReport) -> str:
    """Short human summaries of the non-throughput sections (the JSON has everything)."""
    lines: list[str] = []
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
