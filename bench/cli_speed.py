"""How fast the CLI answers (issue 18): wall time of each command a new user types, from process
start to exit, on the embedded default (SQLite, the filesystem broker) with an inventory of
``--rows`` certificates. Each command runs ``--reps`` times, interleaved with the others (a load
change on a shared machine hits every command alike); the table gives the median, the spread
(min..max) and the ratio to the interpreter's own start (``python -c pass``), which is the floor no
import work can go under. Writes JSON under ``bench/results/`` (``<stamp>-cli.json``).

    python -m bench.cli_speed [--reps 9] [--rows 1000]

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
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="certqueue-cli-bench-") as tmp:
        work = Path(tmp)
        env = _env(work)
        cid = _seed(work, env, args.rows)
        cq = [sys.executable, "-m", "certqueue"]
        commands: dict[str, list[str]] = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "--version": [*cq, "--version"],
            "list --json --limit 1": [*cq, "list", "--json", "--limit", "1"],
            "list (table, 50 rows)": [*cq, "list", "--limit", "50"],
            "show ID --json": [*cq, "show", cid, "--json"],
            "status --json": [*cq, "status", "--json"],
            "config show --json": [*cq, "config", "show", "--json"],
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        times["issue NAME"] = []
        load_before = os.getloadavg()
        for rep in range(args.reps):
            for name, cmd in commands.items():
                times[name].append(_run(cmd, env, work))
            times["issue NAME"].append(_run([*cq, "issue", f"new{rep}.cli-bench.example.test"], env, work))
        load_after = os.getloadavg()
    floor = statistics.median(times["python -c pass"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {"command": name, "median_s": med, "min_s": min(ts), "max_s": max(ts), "x_floor": med / floor}
        )
    print(
        f"CLI wall time, {args.reps} interleaved runs, {args.rows} certificates;"
        f" load {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    print("| command | median s | spread s | x python start |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| `{r['command']}` | {r['median_s']:.3f} | {r['min_s']:.3f}..{r['max_s']:.3f}"
            f" | {r['x_floor']:.1f} |"
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
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
