"""Shell completion (issue 16, item 2): docs/cli.md's lines, run as written, print click's script
for bash, zsh and fish; completing through the installed entry point (``certqueue.__main__:run``,
which pauses the garbage collector over startup) answers commands, subcommands, options and
choices, reads no settings and creates nothing in the working directory.

Each case runs the virtual environment's ``certqueue`` script, as a shell's Tab does (or, where
the package is not installed as a script, a process that starts the same way)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import skip_unless_required

REPO = Path(__file__).resolve().parents[3]
SCRIPT = Path(sys.executable).with_name("certqueue")
#: what the installed script does (setuptools' console-script wrapper), for a tree without it
AS_SCRIPT = "import sys; sys.argv[0] = 'certqueue'; from certqueue.__main__ import run; sys.exit(run())"
#: the line each shell's script ends with: the registration of the completion function
REGISTERS = {
    "bash": "complete -o nosort -F _certqueue_completion certqueue",
    "zsh": "compdef _certqueue_completion certqueue",
    "fish": 'complete --no-files --command certqueue --arguments "(_certqueue_completion)"',
}


def _command() -> list[str]:
    return [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", AS_SCRIPT]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CERTQUEUE_", "COMP_", "_CERTQUEUE"))}
    env["PYTHONPATH"] = str(REPO)  # where the package is not installed, the checkout is it
    return {**env, **extra}


def _run(cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(_command(), cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stderr == "", r.stderr
    return r


def bash_complete(cwd: Path, line: str) -> list[tuple[str, str]]:
    """What the bash script asks for on Tab after ``line`` (a trailing space: a new word)."""
    words = line.split() + ([""] if line.endswith(" ") else [])
    r = _run(
        cwd, _CERTQUEUE_COMPLETE="bash_complete", COMP_WORDS=" ".join(words), COMP_CWORD=str(len(words) - 1)
    )
    return [tuple(item.split(",", 1)) for item in r.stdout.splitlines()]


def plain(items: list[tuple[str, str]]) -> list[str]:
    return [value for kind, value in items if kind == "plain"]


def documented_lines() -> dict[str, str]:
    """docs/cli.md's "Shell completion" block: shell -> the line to put in its start-up file."""
    text = (REPO / "docs" / "cli.md").read_text()
    section = text.split("## Shell completion", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line and not line.startswith("#")]
    return {re.search(r"_CERTQUEUE_COMPLETE=(\w+)_source", line).group(1): line for line in lines}


def test_the_documented_line_of_each_shell_prints_its_script(tmp_path: Path) -> None:
    lines = documented_lines()
    assert lines == {
        "bash": 'eval "$(_CERTQUEUE_COMPLETE=bash_source certqueue)"',
        "zsh": 'eval "$(_CERTQUEUE_COMPLETE=zsh_source certqueue)"',
        "fish": "_CERTQUEUE_COMPLETE=fish_source certqueue | source",
    }
    for shell in lines:
        script = _run(tmp_path, _CERTQUEUE_COMPLETE=f"{shell}_source").stdout
        assert REGISTERS[shell] in script, (shell, script)
        assert f"_CERTQUEUE_COMPLETE={shell}_complete" in script, (shell, script)
    assert list(tmp_path.iterdir()) == []  # no settings read, no database or key file created


def test_commands_subcommands_options_and_choices(tmp_path: Path) -> None:
    assert plain(bash_complete(tmp_path, "certqueue re")) == ["renew", "revoke"]
    assert plain(bash_complete(tmp_path, "certqueue db up")) == ["upgrade"]
    assert plain(bash_complete(tmp_path, "certqueue keys ")) == ["generate", "retire", "rotate", "status"]
    assert plain(bash_complete(tmp_path, "certqueue import --c")) == ["--cert", "--chain"]
    assert plain(bash_complete(tmp_path, "certqueue issue --challenge ")) == [
        "http-01",
        "dns-01",
        "tls-alpn-01",
    ]
    assert plain(bash_complete(tmp_path, "certqueue worker --pool a")) == ["acme", "all"]
    assert bash_complete(tmp_path, "certqueue import --cert ") == [("file", "")]  # the shell lists files
    assert list(tmp_path.iterdir()) == []


def test_zsh_and_fish_answer_with_descriptions(tmp_path: Path) -> None:
    zsh = _run(tmp_path, _CERTQUEUE_COMPLETE="zsh_complete", COMP_WORDS="certqueue iss", COMP_CWORD="1")
    assert zsh.stdout.splitlines()[0::3] == ["plain", "plain"]
    assert zsh.stdout.splitlines()[1::3] == ["issue", "issuers"]
    fish = _run(tmp_path, _CERTQUEUE_COMPLETE="fish_complete", COMP_WORDS="certqueue iss", COMP_CWORD="iss")
    assert [line.split("\t")[0] for line in fish.stdout.splitlines()] == ["plain,issue", "plain,issuers"]


PROBE = """
import atexit, gc, json, sys
out = sys.argv[1]
sys.argv = ["certqueue"]

def report():
    with open(out, "w") as f:
        json.dump({"modules": sorted(sys.modules), "gc_enabled": gc.isenabled()}, f)

atexit.register(report)
from certqueue.__main__ import run
run()
"""


def test_completion_reads_no_settings_and_needs_no_server(tmp_path: Path) -> None:
    """Tab answers at once: through the entry point's start (collector paused), click completes
    before the group's callback, so neither the settings, the database layer nor Celery load,
    and an unreachable database or broker does not matter."""
    out, cwd = tmp_path / "probe.json", tmp_path / "cwd"
    cwd.mkdir()
    env = _env(
        _CERTQUEUE_COMPLETE="bash_complete",
        COMP_WORDS="certqueue rev",
        COMP_CWORD="1",
        CERTQUEUE_DATABASE__URL="postgresql+psycopg://nobody@127.0.0.1:1/none",
        CERTQUEUE_BROKER__URL="redis://127.0.0.1:1/0",
    )
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(out)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "plain,revoke\n", "")
    modules = set(json.loads(out.read_text())["modules"])
    assert "certqueue.cli" in modules
    loaded = sorted(m for m in modules if m.split(".")[0] in ("sqlalchemy", "celery", "pydantic_settings"))
    assert loaded == [], loaded
    assert "certqueue.config" not in modules
    assert list(cwd.iterdir()) == []


def test_bash_runs_the_documented_line(tmp_path: Path) -> None:
    """The whole path a user takes: bash evaluates the documented line, then its completion
    function, called as bash calls it on Tab, fills COMPREPLY through the installed script."""
    if shutil.which("bash") is None:
        skip_unless_required("bash is not installed")
    if not SCRIPT.exists():
        skip_unless_required(f"{SCRIPT} is not installed (make install)")
    script = (
        f"{documented_lines()['bash']}\n"
        "COMP_WORDS=(certqueue keys r); COMP_CWORD=2; _certqueue_completion certqueue\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = _env(PATH=f"{SCRIPT.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    r = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.split() == ["retire", "rotate"]
