"""PNG charts of a run (matplotlib, the ``bench`` extra): written beside the JSON as
``<stamp>-throughput.png``, ``<stamp>-cpu.png`` and ``<stamp>-storm.png``.

* throughput: the median certificates/s per contender (log scale: certbot and the bare loop differ by
  two orders of magnitude), the bar's whisker spanning the repetitions' min to max;
* CPU: whole-system CPU seconds per certificate, stacked by column (client processes, PostgreSQL,
  Redis, Pebble);
* storm: renewed and in flight (RENEWING) over time, and the acme queue's depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import RunReport

_COLORS = {
    "client": "#4c72b0",
    "postgresql": "#55a868",
    "redis": "#c44e52",
    "pebble": "#8172b2",
    "counting proxy (bench)": "#999999",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    rows = [r for r in rows if r.get("certs_per_s")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    names = [f"{r['name']} ({r['group']}, n={r['n']})" for r in rows]
    med = [r["certs_per_s"] for r in rows]
    lo = [m - (r["certs_per_s_spread"] or {}).get("min", m) for m, r in zip(med, rows, strict=True)]
    hi = [(r["certs_per_s_spread"] or {}).get("max", m) - m for m, r in zip(med, rows, strict=True)]
    colors = ["#dd8452" if r["name"].startswith("certqueue") else "#4c72b0" for r in rows]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=3)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("certificates per second (median of repetitions; whiskers: min to max; log scale)")
    ax.set_title("Issuance throughput against one Pebble, fresh per run")
    for yi, m in zip(y, med, strict=True):
        ax.text(m, yi, f" {m:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cpu_chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    rows = [r for r in rows if r.get("system_cpu_per_cert_s")]
    if not rows:
        return None
    plt = _plt()
    columns = sorted(
        {k for r in rows for k in r["system_cpu_per_cert_s"] if k != "total" and not k.startswith("client:")}
    )
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    y = list(range(len(rows)))[::-1]
    left = [0.0] * len(rows)
    for col in columns:
        vals = [(r["system_cpu_per_cert_s"].get(col) or 0.0) for r in rows]
        ax.barh(y, vals, left=left, label=col, color=_COLORS.get(col))
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_yticks(y, [f"{r['name']} ({r['group']})" for r in rows], fontsize=8)
    ax.set_xlabel("CPU seconds per certificate, whole system (median of repetitions)")
    ax.set_title("Where the CPU goes per certificate")
    ax.legend(fontsize=8, loc="lower right")
    for yi, total in zip(y, left, strict=True):
        ax.text(total, yi, f" {total:.3f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def storm_chart(storm: dict[str, Any], path: Path) -> Path | None:
    timeline = storm.get("timeline") or []
    if not timeline or len(timeline[0]) < 4:
        return None
    plt = _plt()
    t = [p[0] for p in timeline]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, [p[1] for p in timeline], label="renewed", color="#55a868")
    ax.plot(t, [p[2] for p in timeline], label="in flight (RENEWING)", color="#dd8452")
    ax.plot(t, [p[3] for p in timeline], label="acme queue depth", color="#4c72b0", linewidth=0.8)
    ax.set_xlabel("seconds since beat started")
    ax.set_ylabel("certificates / messages")
    ax.set_title(
        f"Renewal storm: {storm.get('certificates')} due at once, {storm.get('status')}, "
        f"{storm.get('renewed')} renewed in {storm.get('elapsed_s', 0):.0f} s"
    )
    for ev in storm.get("events", []):
        ax.axvline(ev["t_s"], color="#c44e52", linestyle="--", linewidth=0.8)
        ax.text(ev["t_s"], ax.get_ylim()[1] * 0.95, f" {ev['what']}", fontsize=7, color="#c44e52")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_charts(report: RunReport, stem: Path) -> list[Path]:
    """Write every chart the run has data for; ``stem`` is the JSON path without its suffix."""
    return charts_from_json({"cases": report.rows(), "sections": report.sections}, stem)


def charts_from_json(data: dict[str, Any], stem: Path) -> list[Path]:
    rows = data.get("cases") or []
    out = [
        throughput_chart(rows, stem.with_name(stem.name + "-throughput.png")),
        cpu_chart(rows, stem.with_name(stem.name + "-cpu.png")),
    ]
    storm = (data.get("sections") or {}).get("storm")
    if storm:
        out.append(storm_chart(storm, stem.with_name(stem.name + "-storm.png")))
    return [p for p in out if p is not None]


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.charts RESULTS.json``: (re)draw the charts of a run already written."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m bench.charts")
    ap.add_argument("results", type=Path)
    args = ap.parse_args(argv)
    for png in charts_from_json(json.loads(args.results.read_text()), args.results.with_suffix("")):
        print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
