"""Dependency floors and the hash-pinned lock files (issue 13, finding 7): no floor admits a version
with the published advisories listed in the issue, and what CI (`make install`) and the Docker image
install is pinned, every package with its hashes, to versions above those floors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
#: package -> first version without the advisories named in issue 13
FIXED = {
    "idna": "3.7",
    "cryptography": "44.0.1",
    "requests": "2.32.4",
    "starlette": "0.47.2",
    "h11": "0.16.0",
    "tornado": "6.5.0",
    "urllib3": "2.5.0",
}


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("certqueue[")]
    return {r.name.lower(): r for r in reqs}


def _pins(path: Path) -> dict[str, tuple[Version, int]]:
    text = path.read_text()
    pins: dict[str, tuple[Version, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\]+)", block)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = (Version(m.group(2)), block.count("--hash=sha256:"))
    return pins


@pytest.mark.parametrize(("name", "fixed"), sorted(FIXED.items()))
def test_floors_exclude_the_advisories(name: str, fixed: str) -> None:
    req = _declared()[name]
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert floors and min(floors) >= Version(fixed), f"{req}: must be >= {fixed}"


@pytest.mark.parametrize("lock", ["runtime.txt", "dev.txt"])
def test_the_lock_pins_everything_with_hashes(lock: str) -> None:
    path = REPO / "requirements" / lock
    text = path.read_text()
    pins = _pins(path)
    assert pins, lock
    unpinned = [
        line
        for line in text.splitlines()
        if line and not line.startswith((" ", "#", "-")) and "==" not in line
    ]
    assert unpinned == [], unpinned
    assert all(n >= 1 for _v, n in pins.values()), [k for k, (_v, n) in pins.items() if n < 1]
    for name, fixed in FIXED.items():
        if name in pins:
            assert pins[name][0] >= Version(fixed), f"{lock}: {name} {pins[name][0]} < {fixed}"
    for name, req in _declared().items():
        if name in pins:
            assert pins[name][0] in req.specifier, f"{lock}: {name} {pins[name][0]} outside {req.specifier}"
    assert "certqueue" not in pins  # the project itself is installed from the tree


def test_ci_and_the_image_install_from_the_locks() -> None:
    make = (REPO / "Makefile").read_text()
    assert "pip install -q --require-hashes -r requirements/dev.txt" in make
    assert "pip install -q --no-deps -e ." in make
    docker = (REPO / "docker" / "Dockerfile").read_text()
    assert "--require-hashes -r requirements/runtime.txt" in docker


def test_the_postgresql_driver_is_in_the_base_install() -> None:
    """PostgreSQL is the production database: `pip install certqueue` must be able to reach it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert "psycopg" in base
    assert "psycopg" in _pins(REPO / "requirements" / "runtime.txt")
