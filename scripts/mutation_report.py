"""Summarise ``mutmut results --all true`` (read on stdin): kill rate per module, then every mutant
that survived (or that no test reached), with the command that shows its diff.

Used by ``make mutation``; docs/testing.md says how to read the report.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

LINE = re.compile(r"^\s*(?P<name>\S+): (?P<status>.+?)\s*$")
MODULE = re.compile(r"^(?P<module>.+?)\.x(?:_|ǁ)")
KILLED = {"killed", "timeout"}  # mutmut counts a mutant that made the tests hang as caught
UNCAUGHT = {"survived", "no tests", "suspicious"}


def main() -> int:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    uncaught: dict[str, list[str]] = defaultdict(list)
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        name, status = m["name"], m["status"]
        mod = MODULE.match(name)
        module = mod["module"] if mod else name
        counts[module][status] += 1
        if status in UNCAUGHT:
            uncaught[module].append(f"{name} ({status})")
    if not counts:
        print("no mutmut results: run `make mutation` first", file=sys.stderr)
        return 1
    print(f"{'module':40} {'mutants':>7} {'run':>5} {'killed':>6} {'uncaught':>8} {'kill rate':>9}")
    total_run = total_killed = 0
    for module in sorted(counts):
        c = counts[module]
        killed = sum(c[s] for s in KILLED)
        run = killed + sum(c[s] for s in UNCAUGHT)
        total_run += run
        total_killed += killed
        rate = f"{100 * killed / run:.1f}%" if run else "-"
        print(f"{module:40} {sum(c.values()):7} {run:5} {killed:6} {run - killed:8} {rate:>9}")
    if total_run:
        print(
            f"{'all':40} {'':7} {total_run:5} {total_killed:6} {total_run - total_killed:8} "
            f"{100 * total_killed / total_run:8.1f}%"
        )
    not_run = sum(c["not checked"] for c in counts.values())
    if not_run:
        print(f"\n{not_run} mutants not run yet (`mutmut run` was stopped, or a glob excluded them)")
    for module in sorted(uncaught):
        print(f"\n{module}: {len(uncaught[module])} uncaught (show one with `mutmut show NAME`)")
        for entry in uncaught[module]:
            print(f"  {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
