"""The built wheel in a fresh virtual environment, with no checkout in reach (issue 16, item 4).

What a new user gets from ``pip install certqueue``: the wheel is built from a copy of the sources
(the checkout's own ``build/`` could leak stale files into it), installed with its declared
dependencies into a new venv by that venv's own pip, and the installed ``certqueue`` script is run
from an empty directory with a clean environment (no PYTHONPATH, no user site, no CERTQUEUE_*
variable): ``--help``, ``keys generate``, ``db upgrade`` on a new SQLite file, ``import`` of a
self-signed certificate and its key, ``list``. Also the metadata an index shows (license,
classifiers, URLs), the entry point, and shell completion through the installed script.

Dependencies come from the package index (through pip's cache); where the index cannot be reached
this skips on a developer machine and fails where tools are required (``tests/conftest.py``).
``-m packaging`` selects it; about 20 s on an idle 2-core machine (build 2 s, venv 3 s, install
10 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import skip_unless_required
from tests.conftest_db import make_cert_pem

pytestmark = [pytest.mark.integration, pytest.mark.packaging]

REPO = Path(__file__).resolve().parents[2]
#: what the wheel is built from (pyproject's readme and license-files, the package, and devstack/
#: beside it as in the checkout: the packaging settings, not its absence, keep it out)
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "certqueue", "devstack")
#: pip's words for "the index is not reachable" (not for a dependency that does not exist)
OFFLINE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Network is unreachable|ConnectTimeout|ProxyError|Name or service not known"
)


@dataclass
class Installed:
    venv: Path
    home: Path  # an empty working directory, outside the checkout
    env: dict[str, str]
    wheel_files: list[str]  # every file in the wheel

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def script(self) -> Path:
        return self.venv / "bin" / "certqueue"

    def probe(self, code: str) -> Any:
        """What ``code`` prints as JSON, run by the installed interpreter from the empty directory."""
        r = subprocess.run(
            [str(self.python), "-c", code],
            cwd=self.home,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return json.loads(r.stdout)

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.script), *args],
            cwd=self.home,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        r = self.run(*args)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r


def _clean_env(venv: Path) -> dict[str, str]:
    """The caller's environment without anything that would put the checkout or the test's
    settings in reach; pip's own settings (index, cache, certificates) are kept."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTEST_ADDOPTS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTQUEUE_") and k not in drop}
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", PYTHONNOUSERSITE="1", PIP_NO_INPUT="1")
    return env


def _pip(cmd: list[str], env: dict[str, str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        if OFFLINE.search(out):
            skip_unless_required(f"the package index is not reachable: {OFFLINE.search(out).group(0)}")
        pytest.fail(f"{' '.join(cmd[:4])} failed ({r.returncode}):\n{out[-4000:]}", pytrace=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("clean-install")
    src, dist, venv, home = tmp / "src", tmp / "dist", tmp / "venv", tmp / "home"
    src.mkdir()
    home.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    env = _clean_env(venv)
    # pip of the test's interpreter builds (in its isolated build environment: setuptools from
    # the index); the new venv's own pip installs, as a user's would
    _pip([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)], env, tmp)
    wheels = list(dist.glob("certqueue-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as whl:
        (tmp / "wheel-files.txt").write_text("\n".join(whl.namelist()))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], env=env, check=True, timeout=300)
    _pip([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheels[0])], env, home)
    return Installed(venv=venv, home=home, env=env, wheel_files=(tmp / "wheel-files.txt").read_text().split())


def test_the_checkout_is_out_of_reach(installed: Installed) -> None:
    """The installed copy is the one imported, and nothing on sys.path leads to the checkout."""
    probe = "import json, sys, certqueue; print(json.dumps([certqueue.__file__, sys.path]))"
    where, path = installed.probe(probe)
    assert Path(where).is_relative_to(installed.venv), where
    assert not [p for p in path if p and Path(p).resolve().is_relative_to(REPO)], path
    pth = [f.read_text() for f in installed.venv.glob("lib/python*/site-packages/*.pth")]
    assert not [t for t in pth if str(REPO) in t], pth  # no editable install behind it


def test_no_devstack_module_is_in_the_wheel(installed: Installed) -> None:
    """The test and demo servers (Pebble, BIND, moto, fake clouds) stay in the checkout (issue 16)."""
    assert any(f.startswith("certqueue/") for f in installed.wheel_files)
    shipped = [f for f in installed.wheel_files if "devstack" in f.lower()]
    assert not shipped, shipped
    tops = {f.split("/", 1)[0] for f in installed.wheel_files if not f.startswith("certqueue-")}
    assert tops == {"certqueue"}, tops
    found = installed.probe(
        "import importlib.util, json;"
        "print(json.dumps([m for m in ('devstack', 'certqueue.devstack') if importlib.util.find_spec(m)]))"
    )
    assert found == []


def test_demo_from_the_wheel_says_to_use_a_checkout(installed: Installed) -> None:
    """``certqueue demo`` needs the test servers of a checkout: one line saying so, nothing started
    and nothing written."""
    r = installed.run("demo")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1, r.stderr
    assert "checkout" in r.stderr and "make demo" in r.stderr, r.stderr
    assert list(installed.home.glob("var*")) == [], list(installed.home.iterdir())


def test_help_lists_the_commands(installed: Installed) -> None:
    r = installed.ok("--help")
    assert r.stdout.startswith("Usage: certqueue")
    for command in ("issue", "renew", "revoke", "import", "list", "db", "keys", "worker"):
        assert re.search(rf"^\s+{command}\s", r.stdout, re.M), command


def test_db_upgrade_then_import_and_list(installed: Installed) -> None:
    """A new user's first commands, in an empty directory: a key, the schema on a new SQLite file,
    a certificate brought in, and the inventory shows it."""
    home = installed.home
    db = f"sqlite:///{home / 'certqueue.db'}"
    r = installed.ok("keys", "generate", "--path", str(home / "master.key"))
    assert "mode 0600" in r.stdout
    key_env = {"CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(home / "master.key")}
    r = installed.ok("--database", db, "db", "upgrade")
    assert r.stdout.startswith("database at revision ") and r.stdout.count("\n") == 1, r.stdout
    assert r.stderr == ""  # no alembic INFO lines (it logs them as it is imported, 1.18+)
    assert (home / "certqueue.db").stat().st_size > 0
    leaf, key = make_cert_pem(("shop.example.com", "www.shop.example.com"), days=60)
    (home / "fullchain.pem").write_text(leaf)
    (home / "privkey.pem").write_bytes(key)
    r = installed.run(
        "--database", db, "import", "--cert", "fullchain.pem", "--key", "privkey.pem", "--json", env=key_env
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    imported = json.loads(r.stdout)
    assert imported["state"] == "ACTIVE"
    r = installed.run("--database", db, "list", "--json", env=key_env)
    assert r.returncode == 0, r.stderr
    rows = {c["id"]: c for c in json.loads(r.stdout)}
    assert rows[imported["certificate_id"]]["domains"] == ["shop.example.com", "www.shop.example.com"]
    assert rows[imported["certificate_id"]]["external"] is True
    r = installed.run("--database", db, "list", env=key_env)  # piped: plain tab-separated lines
    # id, state, expiry, then the first name and how many more
    assert f"{imported['certificate_id']}\tACTIVE\t" in r.stdout, r.stdout
    assert "\tshop.example.com +1\n" in r.stdout, r.stdout


def _metadata(installed: Installed) -> dict[str, Any]:
    probe = (
        "import json, importlib.metadata as m; d = m.distribution('certqueue'); md = d.metadata;"
        "print(json.dumps({'license': md['License-Expression'], 'license_files': md.get_all('License-File'),"
        " 'classifiers': md.get_all('Classifier'), 'urls': md.get_all('Project-URL'),"
        " 'requires': md.get_all('Requires-Dist'),"
        " 'scripts': {e.name: e.value for e in d.entry_points if e.group == 'console_scripts'},"
        " 'files': [str(f) for f in d.files]}))"
    )
    return dict(installed.probe(probe))


def test_the_metadata_an_index_shows(installed: Installed) -> None:
    md = _metadata(installed)
    assert md["license"] == "Apache-2.0"  # PEP 639: an SPDX expression, not a License classifier
    assert md["license_files"] == ["LICENSE"]
    assert "certqueue-0.1.0.dist-info/licenses/LICENSE" in md["files"]
    assert not [c for c in md["classifiers"] if c.startswith("License ::")]
    assert "Programming Language :: Python :: 3.11" in md["classifiers"]
    urls = dict(u.split(", ", 1) for u in md["urls"])
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(urls), urls
    assert all(u.startswith("https://") for u in urls.values()), urls
    assert md["scripts"] == {"certqueue": "certqueue.__main__:run"}
    base = {re.split(r"[\[<>=;! ]", r, maxsplit=1)[0].lower() for r in md["requires"] if "extra ==" not in r}
    assert "psycopg" in base  # PostgreSQL, the production database, needs no extra
    # what `db upgrade` reads at run time is in the wheel, not only in the checkout, and so are
    # the payload schemas of the wire contract (docs/wire-contract.md)
    assert any(f.startswith("certqueue/migrations/versions/") for f in md["files"])
    schemas = {
        f"certqueue/{p.relative_to(REPO / 'certqueue')}" for p in REPO.glob("certqueue/schemas/*/*.json")
    }
    assert schemas and schemas <= set(md["files"]), sorted(schemas - set(md["files"]))


def test_shell_completion_through_the_installed_script(installed: Installed, tmp_path: Path) -> None:
    """docs/cli.md's bash line, in bash, with the installed script (its start pauses the garbage
    collector; click answers the completion request before any settings, database or broker are
    touched: the working directory stays empty)."""
    if shutil.which("bash") is None:
        skip_unless_required("bash is not installed")
    script = (
        'eval "$(_CERTQUEUE_COMPLETE=bash_source certqueue)"\n'
        "COMP_WORDS=(certqueue re); COMP_CWORD=1; _certqueue_completion certqueue\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        cwd=tmp_path,
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["renew", "revoke"], (r.stdout, r.stderr)
    assert list(tmp_path.iterdir()) == []
