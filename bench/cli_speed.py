"""How fast the CLI answers (issue 18): wall time of each command a new user types, from process
start to exit, on the embedded default (SQLite, the filesystem broker) with an inventory of
``--rows`` certificates. Each command runs ``--reps`` times, interleaved with the others (a load
change on a shared machine hits every command alike); the table gives the median, the spread
(min..max) and the ratio to the interpreter's own start (``python -c pass``), which is the floor no
import work can go under. Writes JSON under ``bench/results/`` (``<stamp>-cli.json``).

    python -m bench.cli_speed [--reps 9] [--rows 1000] [--baseline OTHER_CHECKOUT/.venv/bin/python]

``--baseline`` runs every command also with another checkout's interpreter (an older certqueue, on
the same inventory: the schema must match), interleaved with this one, and the table gives both and
their ratio: a before/after in one run. Both source trees are byte-compiled first (a machine that
sets PYTHONDONTWRITEBYTECODE would otherwise recompile certqueue in every command, about 0.3 s).

Not a test: timings never decide pass or fail; the targets (read commands under 0.4 s, ``issue``
without ``--wait`` under 0.5 s on this kind of machine) are read off the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _env(work: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CERTQUEUE_")},
        "CERTQUEUE_SETTINGS_DIR": str(work / "settings"),
        "CERTQUEUE_DATABASE__URL": f"sqlite:///{work / 'certqueue.db'}",
        "CERTQUEUE_BROKER__FILESYSTEM_PATH": str(work / "broker"),
        "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(work / "master.key"),
        "CERTQUEUE_ACME__EMAIL": "bench@example.test",
    }


def _compile(python: str) -> None:
    """Byte-compile the certqueue that ``python`` imports (its .pyc may be missing)."""
    where = subprocess.run(
        [python, "-c", "import certqueue, os; print(os.path.dirname(certqueue.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run([python, "-m", "compileall", "-q", where], check=True, capture_output=True)


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _seed(work: Path, env: dict[str, str], rows: int) -> str:
    """An inventory of ``rows`` requested certificates (one transaction); returns one id."""
    (work / "settings").mkdir(parents=True, exist_ok=True)
    cq = [sys.executable, "-m", "certqueue"]
    subprocess.run(
        [*cq, "keys", "generate", "--path", str(work / "master.key")],
        env=env,
        cwd=work,
        check=True,
        capture_output=True,
    )
    subprocess.run([*cq, "db", "upgrade"], env=env, cwd=work, check=True, capture_output=True)
    names = work / "names.txt"
    names.write_text("".join(f"host{i}.cli-bench.example.test\n" for i in range(rows)))
    subprocess.run(
        [*cq, "issue", "--from-file", str(names)], env=env, cwd=work, check=True, capture_output=True
    )
    out = subprocess.run(
        [*cq, "list", "--json", "--limit", "1"], env=env, cwd=work, check=True, capture_output=True, text=True
    )
    return str(json.loads(out.stdout)[0]["id"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cli_speed")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--baseline", help="another checkout's python, run interleaved (before/after)")
    args = ap.parse_args(argv)
    pythons = {"": sys.executable, **({"baseline ": args.baseline} if args.baseline else {})}
    for py in pythons.values():
        _compile(py)
    with tempfile.TemporaryDirectory(prefix="certqueue-cli-bench-") as tmp:
        work = Path(tmp)
        env = _env(work)
        cid = _seed(work, env, args.rows)
        commands: dict[str, list[str]] = {}
        for label, py in pythons.items():
            cq = [py, "-m", "certqueue"]
            commands.update(
                {
                    f"{label}python -c pass": [py, "-c", "pass"],
                    f"{label}--version": [*cq, "--version"],
                    f"{label}list --json --limit 1": [*cq, "list", "--json", "--limit", "1"],
                    f"{label}list (table, 50 rows)": [*cq, "list", "--limit", "50"],
                    f"{label}show ID --json": [*cq, "show", cid, "--json"],
                    f"{label}status --json": [*cq, "status", "--json"],
                    f"{label}config show --json": [*cq, "config", "show", "--json"],
                }
            )
        times: dict[str, list[float]] = {k: [] for k in commands}
        for label in pythons:
            times[f"{label}issue NAME"] = []
        load_before = os.getloadavg()
        for rep in range(args.reps):
            for name, cmd in commands.items():
                times[name].append(_run(cmd, env, work))
            for label, py in pythons.items():
                name = f"new{rep}{label.strip()}.cli-bench.example.test"
                times[f"{label}issue NAME"].append(_run([py, "-m", "certqueue", "issue", name], env, work))
        load_after = os.getloadavg()
    floor = statistics.median(times["python -c pass"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"command": name, "median_s": med, "min_s": min(ts), "max_s": max(ts), "x_floor": med / floor}
        if args.baseline and not name.startswith("baseline "):
            base = statistics.median(times[f"baseline {name}"])
            row["baseline_median_s"] = base
            row["x_baseline"] = med / base
        rows.append(row)
    print(
        f"CLI wall time, {args.reps} interleaved runs, {args.rows} certificates;"
        f" load {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    if args.baseline:
        print(f"baseline: {args.baseline}")
        print("| command | median s | spread s | x python start | baseline median s | x baseline |")
        print("| --- | --- | --- | --- | --- | --- |")
    else:
        print("| command | median s | spread s | x python start |")
        print("| --- | --- | --- | --- |")
    for r in rows:
        if r["command"].startswith("baseline "):
            continue
        extra = f" | {r['baseline_median_s']:.3f} | {r['x_baseline']:.2f}" if "x_baseline" in r else ""
        print(
            f"| `{r['command']}` | {r['median_s']:.3f} | {r['min_s']:.3f}..{r['max_s']:.3f}"
            f" | {r['x_floor']:.1f}{extra} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d-%H%M%S")
    path = args.out / f"{stamp}-cli.json"
    path.write_text(
        json.dumps(
            {
                "reps": args.reps,
                "rows": args.rows,
                "load": [load_before, load_after],
                "python": sys.version,
                "baseline": args.baseline,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
