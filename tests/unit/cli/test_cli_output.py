"""The CLI's output formats (``-o table|wide|json|tsv``, ``--json``), its tables on a terminal and
piped, ``--staging``, renew with no ids, the one-line errors a new user meets, help on every option
and argument, and the modules' imports (no cycle through certqueue.cli)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from certqueue import cli_output
from certqueue.cli import main
from certqueue.config import LETS_ENCRYPT_STAGING
from certqueue.db import session_scope
from certqueue.models import Certificate, Intent, utcnow
from tests.unit.cli.test_cli import (
    Cli,
    active_certificate,
    assert_one_line_error,
    cli_session,
    import_file,
    rows,
)

LONG = "a-name-long-enough-to-be-folded-in-a-drawn-table.example.com"


@pytest.fixture
def cli(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    yield from cli_session(tmp_path, sqlite_url, monkeypatch)


def _commands(
    cmd: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))


#: every command that prints data (answers included): each takes -o and --json
PRINTS_DATA = {
    ("list",),
    ("show",),
    ("status",),
    ("issue",),
    ("renew",),
    ("revoke",),
    ("propagate",),
    ("import",),
    ("scan",),
    ("config", "show"),
    ("keys", "status"),
    ("tokens", "create"),
    ("tokens", "list"),
    ("accounts", "list"),
    ("accounts", "rollover"),
    ("issuers", "list"),
    ("issuers", "show"),
    ("events", "list"),
    ("adopt", "certbot"),
    ("adopt", "cert-manager"),
}


def test_every_command_that_prints_data_takes_o_and_json() -> None:
    with_output = set()
    for path, cmd in _commands(main):
        opts = {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}
        if "--json" in opts or "-o" in opts:
            assert {"-o", "--output", "--json"} <= opts, path
            (choice,) = [p for p in cmd.params if "-o" in getattr(p, "opts", ())]
            assert isinstance(choice.type, click.Choice)
            assert list(choice.type.choices) == ["table", "wide", "json", "tsv"]
            with_output.add(path)
    assert with_output == PRINTS_DATA


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("show", "{id}"),
        ("config", "show"),
        ("keys", "status"),
        ("tokens", "list"),
        ("accounts", "list"),
        ("issuers", "list"),
        ("issuers", "show", "default"),
        ("events", "list"),
    ],
)
def test_o_json_is_json(cli: Cli, args: tuple[str, ...]) -> None:
    cid, _ = active_certificate((LONG, "www.example.com"))
    cli.ok("tokens", "create", "bot")
    argv = [a.format(id=cid) for a in args]
    assert json.loads(cli.ok(*argv, "-o", "json").stdout) == json.loads(cli.ok(*argv, "--json").stdout)


def test_json_and_another_format_together_is_a_usage_error(cli: Cli) -> None:
    r = cli("list", "--json", "-o", "tsv")
    assert r.exit_code == 2 and "give one of --json and -o tsv" in r.output


def test_tsv_is_a_header_and_one_whole_line_per_record(cli: Cli) -> None:
    names = (LONG, "b.example.com", "c.example.com")
    cid, _ = active_certificate(names)
    other = cli.json("issue", "other.example.com")["certificate_id"]
    lines = cli.ok("list", "-o", "tsv").stdout.splitlines()
    header = lines[0].split("\t")
    assert header == ["id", "state", "expires", "names", "issuer", "CA", "challenge", "renew at", "waiting"]
    assert len(lines) == 3  # no title, no blank line
    by_id = {line.split("\t")[0]: dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]}
    mine = by_id[cid]
    assert mine["names"] == ",".join(names)  # whole, comma-joined, for cut -f4 | tr , '\n'
    assert mine["state"] == "ACTIVE" and mine["challenge"] == "http-01"
    assert dt.datetime.fromisoformat(mine["expires"]) > utcnow()  # the whole timestamp
    assert mine["CA"] == "acme-v02.api.letsencrypt.org"
    assert by_id[other]["state"] == "REQUESTED" and by_id[other]["expires"] == ""


def test_table_shows_the_first_name_and_a_count_wide_shows_every_name_and_more(cli: Cli) -> None:
    cid, _ = active_certificate(("first.example.com", "second.example.com", "third.example.com"))
    table = cli.ok("list").stdout.splitlines()
    # id, state, the day it expires, then names: what fits 80 columns
    assert table[1].split("\t") == ["id", "state", "expires", "names"]
    _, state, expires, names = table[2].split("\t")
    assert state == "ACTIVE" and names == "first.example.com +2"
    assert dt.date.fromisoformat(expires) > utcnow().date()
    wide = cli.ok("list", "-o", "wide").stdout.splitlines()
    assert wide[1].split("\t") == [
        "id",
        "state",
        "expires",
        "names",
        "issuer",
        "CA",
        "challenge",
        "renew at",
        "waiting",
    ]
    row = wide[2].split("\t")
    assert row[0] == cid and row[3] == "first.example.com, second.example.com, third.example.com"
    assert row[6] == "http-01" and row[7]  # the renewal time


def test_a_deferral_gets_a_column_in_the_table(cli: Cli) -> None:
    cid = cli.json("issue", "wait.example.com")["certificate_id"]
    with session_scope() as s:
        c = s.get_one(Certificate, cid)
        c.waiting_reason = "rate limit: certificates per domain example.com"
        c.next_attempt_at = utcnow() + dt.timedelta(hours=1)
    lines = cli.ok("list").stdout.splitlines()
    assert lines[1].split("\t")[-1] == "waiting"
    assert lines[2].split("\t")[-1].startswith("rate limit: certificates per domain example.com, resumes ")


def _on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_output, "stdout_is_terminal", lambda: True)
    monkeypatch.setattr(cli_output, "console", cli_output._LazyConsole(width=80, force_terminal=True))


def test_a_terminal_gets_a_drawn_table_with_ids_and_states_whole_at_80_columns(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid, _ = active_certificate((LONG, "b.example.com"))
    _on_a_terminal(monkeypatch)
    out = cli.ok("list").stdout
    assert "┏" in out and "│" in out
    assert cid in out and "ACTIVE" in out  # not folded, not cut
    assert max(len(click.unstyle(line)) for line in out.splitlines()) <= 80
    wide = click.unstyle(cli.ok("list", "-o", "wide").stdout)
    # wide: every column at its width (the terminal wraps the line), every name on its own line
    assert LONG in wide and "b.example.com" in wide and "acme-v02.api.letsencrypt.org" in wide


def test_config_show_piped_greps_to_whole_keys_and_values(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTQUEUE_ACME__EAB_HMAC_KEY", "very-secret-hmac")
    for output in ((), ("-o", "tsv"), ("-o", "wide")):
        text = cli.ok("config", "show", *output).stdout
        assert not any(ch in text for ch in "│┃━─")
        assert "very-secret-hmac" not in text
        [line] = [x for x in text.splitlines() if x.startswith("automation.renewal_threshold_days")]
        assert line.split("\t") == ["automation.renewal_threshold_days", "30", "default"]
        [secret] = [x for x in text.splitlines() if x.startswith("acme.eab_hmac_key")]
        assert secret.split("\t")[0] == "acme.eab_hmac_key" and "very-secret" not in secret


def test_requests_answer_in_tsv(cli: Cli) -> None:
    lines = cli.ok("issue", "tsv.example.com", "-o", "tsv").stdout.splitlines()
    assert lines[0] == "certificate_id\tcreated\tstate"
    cid, created, state = lines[1].split("\t")
    assert cid.startswith("cert_") and created == "true" and state == ""
    assert cli.ok("scan", "-o", "tsv").stdout.splitlines()[0] == "task\tid"
    active, _ = active_certificate()
    lines = cli.ok("revoke", active, "-o", "tsv").stdout.splitlines()
    assert lines[0].split("\t") == ["certificate_id", "reason", "requested", "state"]
    assert lines[1].split("\t")[:3] == [active, "unspecified", "true"]
    tokens = cli.ok("tokens", "list", "-o", "tsv").stdout.splitlines()
    assert tokens == ["id\tname\tscopes\tcreated\tlast used\trevoked"]


def test_renew_with_no_ids_prints_what_it_asked_to_renew(cli: Cli) -> None:
    due, _ = active_certificate(("due.example.com",))
    not_due, _ = active_certificate(("not-due.example.com",))
    with session_scope() as s:
        s.get_one(Certificate, due).renew_at = utcnow() - dt.timedelta(hours=1)
    out = cli.ok("renew").stdout.splitlines()
    assert out == [f"{due} renewal requested", "renewal requested for 1 certificate(s)"]
    assert rows(Intent) == 1
    assert cli.ok("renew", "-o", "tsv").stdout.splitlines()[0] == "certificate_id\tresult"
    del not_due


def test_issue_staging_orders_from_lets_encrypt_staging(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTQUEUE_ACME__FALLBACK_DIRECTORY_URLS", '["https://ca.example.net/directory"]')
    cid = cli.json("issue", "--staging", "staging.example.com")["certificate_id"]
    with session_scope(write=False) as s:
        c = s.get_one(Certificate, cid)
        # staging only: a fallback CA would issue a trusted certificate nobody asked for
        assert c.directory_url == LETS_ENCRYPT_STAGING and c.directory_urls in (None, [LETS_ENCRYPT_STAGING])


def test_staging_for_a_ca_with_no_staging_twin_is_one_line_and_writes_nothing(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERTQUEUE_ACME__DIRECTORY_URL", "https://ca.example.net/directory")
    for args in (
        ("issue", "--staging", "x.example.com"),
        ("issue", "--dry-run", "--staging", "x.example.com"),
    ):
        assert_one_line_error(
            cli(*args), 2, "https://ca.example.net/directory has no known staging directory"
        )
    assert rows(Certificate) == 0 and rows(Intent) == 0


def test_renew_staging_needs_dry_run_and_dry_run_refuses_imported(cli: Cli) -> None:
    cid, _ = active_certificate()
    assert_one_line_error(cli("renew", cid, "--staging"), 2, "needs --dry-run")
    imported = import_file(cli)
    assert_one_line_error(cli("renew", imported, "--dry-run"), 2, "was imported")
    assert_one_line_error(cli("renew", "cert_" + "c" * 20, "--dry-run"), 3, "`certqueue list` shows")
    assert rows(Intent) == 0  # (an import without regions records none)


# --- errors ---------------------------------------------------------------------------------------


def test_an_unknown_id_says_where_the_ids_are(cli: Cli) -> None:
    for args, where in (
        (("show", "cert_" + "a" * 20), "`certqueue list` shows"),
        (("revoke", "cert_" + "a" * 20), "`certqueue list` shows"),
        (("tokens", "revoke", "tok_0123456789abcdef"), "`certqueue tokens list` shows"),
        (("accounts", "rollover", "7"), "`certqueue accounts list` shows"),
    ):
        assert_one_line_error(cli(*args), 3, where)


def test_a_file_that_cannot_be_read_is_one_line(cli: Cli) -> None:
    missing = str(cli.tmp / "missing.pem")
    assert_one_line_error(cli("import", "--cert", missing, "--key", missing), 2, "missing.pem", "readable")
    assert_one_line_error(cli("issue", "--from-file", missing), 2, "--from-file", "No such file")
    assert_one_line_error(cli("adopt", "cert-manager", missing), 2, "FILE", "No such file")
    assert rows(Certificate) == 0


def test_an_unreachable_database_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from certqueue.db import dispose_all

    monkeypatch.setenv("CERTQUEUE_SETTINGS_DIR", str(tmp_path))
    monkeypatch.setenv("CERTQUEUE_RUNTIME_TTL_SECONDS", "0")
    dispose_all()
    url = "postgresql+psycopg://cq:hunter2@127.0.0.1:1/nowhere"
    r = CliRunner().invoke(main, ["--database", url, "list"])
    dispose_all()
    assert r.exit_code == 1, r.output
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert "cannot use postgresql+psycopg://cq:****@127.0.0.1:1/nowhere" in line and "refused" in line
    assert "hunter2" not in r.output and "Traceback" not in r.output


def test_a_message_of_several_lines_is_printed_as_one(cli: Cli) -> None:
    (cli.tmp / "settings" / "local.yaml").write_text("acme: [\n")
    assert_one_line_error(cli("list"), 2, "not valid YAML", "local.yaml")


# --- help and imports -----------------------------------------------------------------------------


def test_every_argument_is_named_in_its_commands_help() -> None:
    missing: list[str] = []
    for path, cmd in _commands(main):
        for p in cmd.params:
            # as the usage line names it: its metavar (KEY=VALUE...) or its name in capitals
            shown = (p.metavar or (p.name or "").upper()).rstrip(".")
            if isinstance(p, click.Argument) and shown not in (cmd.help or ""):
                missing.append(f"{' '.join(path)} {shown}")
    assert missing == []


def test_every_option_has_help() -> None:
    missing = [
        f"{' '.join(path)} {p.opts[0]}"
        for path, cmd in _commands(main)
        for p in cmd.params
        if isinstance(p, click.Option) and not p.hidden and not p.help
    ]
    assert missing == []


@pytest.mark.parametrize(
    "module",
    [
        "certqueue.cli_output",
        "certqueue.cli_ops",
        "certqueue.cli_dryrun",
        "certqueue.cli_accounts",
        "certqueue.cli_adopt",
        "certqueue.cli_events",
        "certqueue.cli_issuers",
        "certqueue.cli_responders",
        "certqueue.demo",
    ],
)
def test_the_cli_modules_and_the_demo_do_not_import_certqueue_cli(module: str) -> None:
    code = f"import sys, {module}; print('certqueue.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_render_keeps_every_value_whole_in_tsv(capsys: pytest.CaptureFixture[str]) -> None:
    records: list[dict[str, Any]] = [
        {"id": "x", "names": ["a.example", "b.example"], "note": "two\twords\nhere"}
    ]
    columns = [
        cli_output.Column("id", "id"),
        cli_output.Column("names", "names", names=True),
        cli_output.Column("note", "note"),
    ]
    cli_output.render(records, columns, "tsv")
    assert capsys.readouterr().out == "id\tnames\tnote\nx\ta.example,b.example\ttwo words here\n"


@pytest.mark.parametrize(
    ("configured", "twin"),
    [
        (None, LETS_ENCRYPT_STAGING),  # no CA configured: Let's Encrypt
        ("https://acme-v02.api.letsencrypt.org/directory", LETS_ENCRYPT_STAGING),
        (LETS_ENCRYPT_STAGING, LETS_ENCRYPT_STAGING),  # a staging directory is its own twin
        ("https://dv.acme-v02.api.pki.goog/directory", "https://dv.acme-v02.test-api.pki.goog/directory"),
        ("https://acme.zerossl.com/v2/DV90", None),
        ("https://localhost:14000/dir", None),  # Pebble, a private CA
    ],
)
def test_the_staging_twin_of_a_directory(configured: str | None, twin: str | None) -> None:
    from certqueue.cli_dryrun import staging_twin

    assert staging_twin(configured) == twin


def test_show_prints_fields_then_tables(cli: Cli) -> None:
    cid, _ = active_certificate(("show.example.com", "www.show.example.com"))
    lines = cli.ok("show", cid).stdout.splitlines()
    assert lines[:2] == [f"id: {cid}", "state: ACTIVE"]
    assert "names: show.example.com, www.show.example.com" in lines
    assert "issuances (1)" in lines and any(line.startswith("events (") for line in lines)
    wide = cli.ok("show", cid, "-o", "wide").stdout.splitlines()
    assert "challenge: http-01" in wide and "CA: acme-v02.api.letsencrypt.org" in wide
    [header, row] = cli.ok("show", cid, "-o", "tsv").stdout.splitlines()
    assert header.split("\t")[:4] == ["id", "state", "expires", "names"]
    assert row.split("\t")[3] == "show.example.com,www.show.example.com"


def test_a_value_that_looks_like_markup_is_printed_as_it_is(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [{"id": "x", "note": "[bold]not a style[/] [red]"}]
    columns = [cli_output.Column("id", "id"), cli_output.Column("note", "note")]
    cli_output.render(records, columns, "table", title="t")  # piped
    assert capsys.readouterr().out.splitlines()[2] == "x\t[bold]not a style[/] [red]"
    _on_a_terminal(monkeypatch)
    cli_output.render(records, columns, "table", title="t")
    assert "[bold]not a style[/] [red]" in click.unstyle(capsys.readouterr().out)


def test_config_show_prints_values_as_they_are(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTQUEUE_ACME__PROFILE", "[red]x")
    for terminal in (False, True):
        if terminal:
            _on_a_terminal(monkeypatch)
        text = click.unstyle(cli.ok("config", "show").stdout)
        assert '"[red]x"' in text, text
