"""The ``certqueue`` command line.

Exit codes scripts can rely on: 0 success, 1 operation failed (a certificate ended FAILED, a server
is unreachable), 2 bad input or configuration (nothing was written), 3 not found, 4 timed out while
waiting. Errors print one line on stderr, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from certqueue import __version__
from certqueue.errors import (
    CertqueueError,
    ConfigError,
    InvalidInput,
    InvalidTransition,
    KeyStoreError,
    NotFound,
)


class _LazyConsole:
    """A rich Console built on first use: a command that prints JSON (or nothing) does not import
    rich, which costs every command tens of milliseconds."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None

    def _get(self) -> Any:
        if self._console is None:
            from rich.console import Console

            options = dict(self._options)
            if not options.get("stderr") and not _stdout_is_terminal():
                options.setdefault("soft_wrap", True)  # a line piped is one line, not folded at 80
            self._console = Console(**options)
        return self._console

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Tables print as tab-separated lines when stdout is not a terminal (a pipe, a file): every
        value whole on its line, for grep, cut and awk, with no box drawing and no folding at 80
        columns. A terminal gets the drawn table."""
        if objects and not self._options.get("stderr") and not _stdout_is_terminal():
            from rich.table import Table as RichTable

            if all(isinstance(o, RichTable) for o in objects):
                for table in objects:
                    _print_plain_table(table)
                return
        self._get().print(*objects, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._get(), name, value)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def _plain(cell: Any) -> str:
    from rich.text import Text

    text = cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain
    return " ".join(text.split())  # one line per row, whatever a value holds


def _print_plain_table(table: Any) -> None:
    """A rich Table as lines: its title, the column names, then one line per row, tab-separated."""
    columns = list(table.columns)
    if table.title:
        click.echo(_plain(table.title))
    click.echo("\t".join(_plain(c.header) for c in columns))
    for row in zip(*(list(c.cells) for c in columns), strict=True):
        click.echo("\t".join(_plain(cell) for cell in row))
    click.echo("")


def Table(*args: Any, **kwargs: Any) -> Any:  # rich's class, imported when a table is drawn
    from rich.table import Table as RichTable

    return RichTable(*args, **kwargs)


console: Any = _LazyConsole()
err_console: Any = _LazyConsole(stderr=True)

EXIT_FAILED, EXIT_INPUT, EXIT_NOT_FOUND, EXIT_TIMEOUT, EXIT_DEFERRED = 1, 2, 3, 4, 5


def _fail(msg: str, code: int) -> None:
    from rich.markup import escape  # a message is text: "certqueue[aws]" is not a style tag

    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, InvalidInput | ConfigError | KeyStoreError | InvalidTransition):
        return EXIT_INPUT
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    return EXIT_FAILED


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except CertqueueError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _fail(exc.message, _exit_code(exc))
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if _no_schema(exc):
                _discard_created_database(ctx)
                _fail(_no_schema_message(ctx), EXIT_INPUT)
            if isinstance(exc, ModuleNotFoundError):
                _fail(_missing_module_message(exc), EXIT_INPUT)
            _fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", EXIT_FAILED)


def _no_schema(exc: BaseException) -> bool:
    """The database has no certqueue tables (a new file, the wrong directory, no migration run)."""
    text = str(getattr(exc, "orig", exc))
    return "no such table" in text or ("relation" in text and "does not exist" in text)


#: the extra (pyproject's optional dependencies) that installs a module a feature needs
EXTRA_OF_MODULE = {
    "boto3": "aws",
    "botocore": "aws",
    "azure": "azure",
    "google": "gcp",
    "cloudflare": "cloudflare",
    "fastapi": "api",
    "fastapi_offline": "api",
    "starlette": "api",
    "uvicorn": "api",
    "httpx": "api",
    "flower": "flower",
    "tornado": "flower",
    "opentelemetry": "tracing",
    "matplotlib": "bench",
}


def _missing_module_message(exc: ModuleNotFoundError) -> str:
    """One line that says what to install (a feature whose extra is not installed)."""
    name = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return (
            f"{exc.name or 'a module'} is not installed (the installation is incomplete: reinstall certqueue)"
        )
    return f"this needs {exc.name}, which is not installed: pip install 'certqueue[{extra}]'"


def _discard_created_database(ctx: click.Context) -> None:
    """A command run in the wrong directory must not leave an empty SQLite file behind it (the next
    command would find that file, and the same error): the file this command created, still
    without a table, is removed."""
    from certqueue.db import dispose_all

    created = (ctx.obj or {}).get("new_sqlite_file")
    if created is None:
        return
    dispose_all()
    for suffix in ("", "-wal", "-shm", "-journal"):
        extra = created.with_name(created.name + suffix)
        with contextlib.suppress(OSError):
            if suffix or extra.stat().st_size == 0 or not _has_tables(extra):
                extra.unlink()


def _has_tables(path: Path) -> bool:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return bool(conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0])
    except sqlite3.Error:
        return True  # not ours to judge: keep it


def _no_schema_message(ctx: click.Context) -> str:
    from certqueue.logsafe import mask_url_password

    loaded = (ctx.obj or {}).get("loaded")
    url = mask_url_password(loaded.settings.database.url) if loaded is not None else "the database"
    return (
        f"{url} has no certqueue tables: run `certqueue db upgrade` (or point --database /"
        " CERTQUEUE_DATABASE__URL at the right database)"
    )


#: set by the entry point (certqueue.__main__), which pauses the garbage collector over startup
startup_gc_paused = False


def end_startup() -> None:
    """Resume the collector the entry point paused, with what startup made frozen out of its view."""
    global startup_gc_paused
    if startup_gc_paused:
        startup_gc_paused = False
        gc.freeze()
        gc.enable()


def _setup(ctx: click.Context, overrides: dict[str, Any]) -> None:
    from certqueue.config import configure

    # every layer, the runtime one read from the database; re-read as it ages (certqueue.runtime)
    loaded = configure(overrides or None)
    ctx.obj["loaded"] = loaded
    from certqueue.runtime import sqlite_file  # (imported by the settings load above)

    db_file = sqlite_file(loaded.settings.database.url)
    if db_file is not None and not db_file.exists():
        ctx.obj["new_sqlite_file"] = db_file  # removed again if it is the wrong place (no tables)
    from certqueue.logconfig import configure_logging  # text or JSON lines, redacted, task context

    configure_logging(loaded.settings)
    if not loaded.settings.broker.url or loaded.settings.broker.url.startswith("filesystem"):
        # kombu warns that the embedded (filesystem) broker has no hostname: it needs none
        logging.getLogger("kombu.connection").setLevel(logging.ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--database", "database_url", help="Database URL (overrides database.url).")
@click.option("--broker", "broker_url", help="Broker URL (overrides broker.url).")
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a setting, e.g. acme.staging=true."
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(__version__, prog_name="certqueue")
@click.pass_context
def main(
    ctx: click.Context, database_url: str | None, broker_url: str | None, sets: Sequence[str], debug: bool
) -> None:
    """certqueue: keep a fleet of TLS certificates issued, renewed and deployed."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    overrides: dict[str, Any] = {}
    if database_url:
        overrides["database.url"] = database_url
    if broker_url:
        overrides["broker.url"] = broker_url
    for s in sets:
        if "=" not in s:
            raise click.BadParameter(f"{s!r} is not KEY=VALUE", param_hint="--set")
        k, v = s.split("=", 1)
        overrides[k.strip()] = _parse_value(v)
    try:
        _setup(ctx, overrides)
    except CertqueueError as exc:
        if debug:
            raise
        _fail(exc.message, _exit_code(exc))
    finally:
        end_startup()


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=True))


# --- config ---------------------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Settings."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """The merged settings, secrets masked, with the layer each value came from."""
    from certqueue.config import masked_dump

    dump = masked_dump(ctx.obj["loaded"])
    rules = _rate_limit_rules(ctx.obj["loaded"].settings)
    if as_json:
        _print_json({**dump, "rate_limits.applied": {"value": rules, "source": "derived"}})
        return
    table = Table(title="certqueue settings", show_lines=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_column("source", style="dim")
    for key, item in dump.items():
        table.add_row(key, json.dumps(item["value"], default=str), item["source"])
    console.print(table)
    limits = Table(title="client-side rate limits per CA", show_lines=False)
    for column in ("CA directory", "rules", "limits", "why"):
        limits.add_column(column, overflow="fold")
    for r in rules:
        text = (
            ", ".join(f"{k} {v}" for k, v in r["limits"].items() if v) or "none (the CA's own answers only)"
        )
        limits.add_row(r["directory"], r["rules"], text, r["source"])
    console.print(limits)


def _rate_limit_rules(settings: Any) -> list[dict[str, Any]]:
    """Which client-side rate limits apply to each configured CA (issue 18: say it, don't guess)."""
    from certqueue.issuers import ca_rules
    from certqueue.lifecycle.ratelimit_policy import (
        WILDCARD,
        applied_rules,
        parse_ca_rule,
        rules_from_settings,
    )

    rl = settings.rate_limits
    extra = ca_rules(settings)
    named = [d for d, _ in (parse_ca_rule(i) for i in [*extra, *rl.ca_rules]) if d != WILDCARD]
    issuer_urls = [i.directory_url for i in settings.issuers]
    directories = [settings.acme.directory, *settings.acme.fallback_directory_urls, *issuer_urls, *named]
    from certqueue.logsafe import mask_url_password

    rules = applied_rules(rules_from_settings(rl, extra), directories)
    for r in rules:  # a directory URL may carry credentials: never printed
        r["directory"] = mask_url_password(r["directory"])
    return rules


@config.command("set")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
def config_set(assignments: Sequence[str]) -> None:
    """Store runtime overrides in the database; every worker sees them within seconds.

    VALUE is JSON (45, 0.5, true). Only thresholds and timers may change at runtime (automation.*,
    rate_limits counts and periods, monitoring.alert_threshold_days, ...: certqueue.runtime.RUNTIME_KEYS);
    targets, commands, paths, endpoints, credentials and CA URLs never come from the database."""
    import asyncio

    from certqueue.manager import update_config

    changes: dict[str, Any] = {}
    for a in assignments:
        if "=" not in a:
            raise InvalidInput(f"{a!r} is not KEY=VALUE", field="assignment")
        k, v = a.split("=", 1)
        changes[k.strip()] = _parse_value(v)
    stored = asyncio.run(update_config(changes, actor=_cli_actor()))
    for key, value in sorted(stored.items()):
        console.print(f"{key} = {json.dumps(value)} [dim](runtime, database)[/]", highlight=False)


@config.command("unset")
@click.argument("keys_", nargs=-1, required=True, metavar="KEY...")
def config_unset(keys_: Sequence[str]) -> None:
    """Remove runtime overrides (and any below KEY)."""
    from certqueue.runtime import clear_override

    removed = sum(clear_override(k, actor=_cli_actor()) for k in keys_)
    console.print(f"removed {removed} runtime override(s)")


def _cli_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


# --- database and keys ------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema (a no-op when current)."""
    from certqueue.migrate import upgrade

    rev = upgrade()
    console.print(f"database at revision [bold]{rev}[/]")


@main.group()
def keys() -> None:
    """The master key that encrypts private keys at rest."""


@keys.command("generate")
@click.option(
    "--path", type=click.Path(path_type=Path), help="Key file (default storage.encryption_key_path)."
)
@click.option("--passphrase-env", metavar="VAR", help="Derive the key from the passphrase in this variable.")
@click.option(
    "--force", is_flag=True, help="Overwrite an existing key file (old ciphertexts become unreadable)."
)
@click.option("--if-missing", is_flag=True, help="Do nothing when the file exists.")
@click.pass_context
def keys_generate(
    ctx: click.Context, path: Path | None, passphrase_env: str | None, force: bool, if_missing: bool
) -> None:
    """Write a new key file, mode 0600."""
    from certqueue.keystore import generate_key_file

    path = path or ctx.obj["loaded"].settings.storage.encryption_key_path
    assert path is not None
    if if_missing and path.exists():
        console.print(f"key file {path} exists")
        return
    passphrase = os.environ.get(passphrase_env) if passphrase_env else None
    if passphrase_env and not passphrase:
        raise InvalidInput(f"environment variable {passphrase_env} is empty", field="passphrase")
    path.parent.mkdir(parents=True, exist_ok=True)
    kid = generate_key_file(path, passphrase=passphrase, overwrite=force)
    console.print(f"wrote key file {path} (key id {kid}, mode 0600)")


@keys.command("rotate")
@click.option("--resume", is_flag=True, help="Re-encrypt what is left without adding a key.")
def keys_rotate(resume: bool) -> None:
    """Phase 1: add a new active key and re-encrypt every stored key under it (retires nothing).

    Running processes load the new key file by themselves within storage.key_check_seconds; then
    `certqueue keys retire` removes the old keys."""
    from certqueue.keyrotation import rotate

    rep = rotate(resume_only=resume)
    console.print(
        f"active key {rep.new_kid or '(unchanged)'}; re-encrypted {rep.reencrypted} records; "
        f"old keys still in the file: {', '.join(rep.old_kids) or 'none'}"
        + ("; run `certqueue keys retire` once every process has loaded the new key" if rep.old_kids else "")
    )


@keys.command("retire")
def keys_retire() -> None:
    """Phase 2: remove old keys from the key file; refused while a row or a live process uses one."""
    from certqueue.keyrotation import retire

    removed = retire()
    console.print(f"retired {', '.join(removed) or 'nothing (only the active key is in the file)'}")


@keys.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def keys_status(ctx: click.Context, as_json: bool) -> None:
    """The key file's keys, the keys rows are under, and the keyring each live process reports."""
    from certqueue.keyrotation import live_processes, remaining_kids, retire_blockers
    from certqueue.keystore import KeyStore

    store = KeyStore.from_file(ctx.obj["loaded"].settings.storage.encryption_key_path)
    data: dict[str, Any] = {
        "active": store.active_kid,
        "keys": sorted(store.kids),
        "rows_under": sorted(remaining_kids(store)),
        "processes": [
            {"process": p.process, "role": p.role, "active_kid": p.active_kid, "seen_at": p.seen_at}
            for p in live_processes()
        ],
        "retire_blocked_by": retire_blockers(store) if store.kids != {store.active_kid} else [],
    }
    if as_json:
        _print_json(data)
        return
    console.print(f"active key {data['active']}; keys in the file: {', '.join(data['keys'])}")
    console.print(f"rows are under: {', '.join(data['rows_under']) or 'none'}")
    for p in data["processes"]:
        console.print(f"  {p['process']} ({p['role']}): {p['active_kid']}", highlight=False)
    for why in data["retire_blocked_by"]:
        console.print(f"[yellow]retire blocked:[/] {why}", highlight=False)


# --- certificates -----------------------------------------------------------------------------------


def _cert_row(c: Any) -> dict[str, Any]:
    iss = c.current_issuance
    return {
        "id": c.id,
        "domains": c.domains,
        "state": c.state,
        "not_after": iss.not_after.isoformat() if iss else None,
        "issuer": iss.issuer if iss else None,
        "serial": iss.serial if iss else None,
        "renew_at": c.renew_at.isoformat() if c.renew_at else None,
        "ari_window": _ari_window(c),
        "challenge_type": c.challenge_type,
        "last_error": c.last_error,
        "external": c.external,
        "waiting": _waiting(c),
    }


def _ari_window(c: Any) -> dict[str, Any] | None:
    """The CA's suggested renewal window (RFC 9773) at the last check, if the CA offers one."""
    start, end = getattr(c, "ari_window_start", None), getattr(c, "ari_window_end", None)
    if start is None or end is None:
        return None
    return {"start": start.isoformat(), "end": end.isoformat(), "explanation_url": c.ari_explanation_url}


def _waiting(c: Any) -> dict[str, Any] | None:
    """Why a certificate's work waits and when it resumes (a rate limit, capacity), if it does."""
    if not c.waiting_reason or c.state not in ("REQUESTED", "ISSUING", "RENEWING"):
        return None
    until = c.next_attempt_at
    return {"reason": c.waiting_reason, "until": until.isoformat() if until else None}


def _waiting_text(w: dict[str, Any] | None) -> str:
    if not w:
        return ""
    when = (w["until"] or "")[:16].replace("T", " ")
    return f"{w['reason']}, resumes {when} UTC" if when else str(w["reason"])


def _short_issuer(issuer: str | None) -> str:
    if not issuer:
        return ""
    for part in issuer.split(","):
        if part.strip().startswith("CN="):
            return part.strip()[3:]
    return issuer


def print_inventory(rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"certificates ({len(rows)})")
    table.add_column("id", no_wrap=True)
    waiting = any(r.get("waiting") for r in rows)
    for col in ("names", "state", "expires", "issuer", *(("waiting",) if waiting else ())):
        table.add_column(col, overflow="fold")
    styles = {"ACTIVE": "green", "FAILED": "red", "REVOKED": "magenta", "EXPIRED": "red"}
    for r in rows:
        names = ", ".join(r["domains"][:3]) + (
            f" (+{len(r['domains']) - 3})" if len(r["domains"]) > 3 else ""
        )
        st = r["state"]
        cells = [
            r["id"],
            names,
            f"[{styles.get(st, 'yellow')}]{st}[/]",
            (r["not_after"] or "")[:19].replace("T", " "),
            _short_issuer(r["issuer"]),
        ]
        if waiting:
            cells.append(_waiting_text(r.get("waiting")))
        table.add_row(*cells)
    console.print(table)


@main.command("list")
@click.option("--state", "states_in", multiple=True, help="Only these states.")
@click.option("--domain", help="Only certificates naming this domain.")
@click.option("--limit", default=100, show_default=True, help="At most this many certificates.")
@click.option("--offset", default=0, help="Skip this many first (with --limit: pages).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(states_in: Sequence[str], domain: str | None, limit: int, offset: int, as_json: bool) -> None:
    """The inventory."""
    from certqueue import inventory
    from certqueue.db import session_scope

    with session_scope(write=False) as s:
        rows = [
            _cert_row(c)
            for c in inventory.list_certificates(
                s, states_in=[x.upper() for x in states_in] or None, domain=domain, limit=limit, offset=offset
            )
        ]
    if as_json:
        _print_json(rows)
    else:
        print_inventory(rows)


@main.command("show")
@click.argument("certificate_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_cmd(certificate_id: str, as_json: bool) -> None:
    """One certificate with its issuances, deployments and recent events."""
    from sqlalchemy import select

    from certqueue import inventory
    from certqueue.db import session_scope
    from certqueue.models import Deployment, Event, Issuance

    with session_scope(write=False) as s:
        c = inventory.get(s, certificate_id)
        data = _cert_row(c)
        data["issuances"] = [
            {
                "id": i.id,
                "serial": i.serial,
                "not_before": i.not_before.isoformat(),
                "not_after": i.not_after.isoformat(),
                "fingerprint": i.fingerprint,
                "revoked": i.revocation_reason,
            }
            for i in s.execute(
                select(Issuance).where(Issuance.certificate_id == c.id).order_by(Issuance.id)
            ).scalars()
        ]
        data["deployments"] = [
            {
                "region": d.region,
                "status": d.status,
                "ref": d.remote_ref,
                "attempts": d.attempts,
                "error": d.last_error,
            }
            for d in s.execute(select(Deployment).where(Deployment.certificate_id == c.id)).scalars()
        ]
        data["events"] = [
            {
                "at": e.at.isoformat(),
                "kind": e.kind,
                "from": e.from_state,
                "to": e.to_state,
                "reason": e.reason,
            }
            for e in s.execute(
                select(Event).where(Event.certificate_id == c.id).order_by(Event.id.desc()).limit(20)
            ).scalars()
        ]
    if as_json:
        _print_json(data)
        return
    console.print_json(json.dumps(data, default=str))


class Deferred(Exception):
    """A waited-for certificate's work was deferred and the caller asked to stop there."""

    def __init__(self, certificate_id: str, waiting: dict[str, Any]) -> None:
        super().__init__(certificate_id)
        self.certificate_id = certificate_id
        self.waiting = waiting


def _wait_states(
    ids: list[str],
    done: Callable[[str], bool],
    timeout: float,
    label: str,
    *,
    stop_on_defer: bool = False,
) -> dict[str, str]:
    """Wait until every certificate is ``done``. A deferral (a rate limit, capacity) is printed on
    stderr when it starts or changes, with its reason and resume time; then the wait goes on, or,
    with ``stop_on_defer``, :class:`Deferred` is raised."""
    from rich.progress import Progress

    from certqueue.db import session_scope
    from certqueue.models import Certificate

    deadline = time.monotonic() + timeout
    result: dict[str, str] = {}
    told: dict[str, str] = {}
    with Progress(console=err_console._get(), transient=True) as progress:
        task = progress.add_task(label, total=len(ids))
        while True:
            deferred: list[tuple[str, dict[str, Any]]] = []
            with session_scope(write=False) as s:
                for cid in ids:
                    c = s.get(Certificate, cid)
                    result[cid] = c.state if c else "MISSING"
                    w = _waiting(c) if c is not None else None
                    if w and told.get(cid) != _waiting_text(w):
                        told[cid] = _waiting_text(w)
                        deferred.append((cid, w))
            for cid, w in deferred:
                progress.console.print(f"{cid} waiting: {_waiting_text(w)}", style="yellow")
                if stop_on_defer:
                    raise Deferred(cid, w)
            finished = sum(1 for v in result.values() if done(v))
            progress.update(task, completed=finished)
            if finished == len(ids) or time.monotonic() > deadline:
                return result
            time.sleep(0.2)


def _nudge() -> None:
    """The request is committed (durable); ask dispatch to run, waiting at most a second for the
    broker (beat's dispatch picks the work up anyway)."""
    from certqueue import nudge

    nudge.nudge()
    nudge.flush(1.0)


@main.command("issue")
@click.argument("domains", nargs=-1)
@click.option(
    "--from-file",
    "from_file",
    type=click.File("r"),
    help="One certificate per line: names, then optional options (see docs/cli.md). '-' reads stdin.",
)
@click.option("--email", help="ACME account contact (default: acme.email).")
@click.option(
    "--challenge",
    "challenge_type",
    type=click.Choice(["http-01", "dns-01", "tls-alpn-01"]),
    help="Challenge type (default: challenges.default_type; wildcards need dns-01).",
)
@click.option("--dns-provider", help="DNS-01 provider name (default: challenges.dns_provider).")
@click.option(
    "--key-type",
    type=click.Choice(["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"]),
    help="Certificate key type (default: acme.key_type).",
)
@click.option("--profile", help="ACME certificate profile the CA offers (e.g. tlsserver, shortlived).")
@click.option("--issuer", help="A named issuer (certqueue issuers list); default: the acme: section.")
@click.option("--region", "targets", multiple=True, help="Deploy to this region (repeatable).")
@click.option("--no-auto-renew", is_flag=True, help="Do not renew it automatically (monitored only).")
@click.option("--wait/--no-wait", default=False, help="Wait until ACTIVE or FAILED.")
@click.option(
    "--exit-on-defer",
    is_flag=True,
    help="With --wait: stop with exit code 5 when the work is deferred (a rate limit, capacity)"
    " instead of waiting for it to resume.",
)
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def issue_cmd(
    domains: Sequence[str],
    from_file: Any,
    email: str | None,
    challenge_type: str | None,
    dns_provider: str | None,
    key_type: str | None,
    profile: str | None,
    issuer: str | None,
    targets: Sequence[str],
    no_auto_renew: bool,
    wait: bool,
    exit_on_defer: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Request a certificate for DOMAINS (one certificate, all names), or many with --from-file."""
    from certqueue import certificates
    from certqueue.db import session_scope

    if from_file is not None:
        if domains:
            raise InvalidInput("give DOMAINS or --from-file, not both", field="domains")
        _issue_many(from_file.read(), as_json)
        return
    if not domains:
        raise InvalidInput("give the names to certify, or --from-file", field="domains")
    req = certificates.CertificateRequest.build(
        domains=list(domains),
        email=email,
        challenge_type=challenge_type,
        dns_provider=dns_provider,
        key_type=key_type,
        profile=profile,
        issuer=issuer,
        targets=list(targets),
        auto_renew=not no_auto_renew,
    )
    from certqueue import operations

    with session_scope() as s:
        cert, created, _intent = operations.request_issue(s, req, actor="cli")
        cid = cert.id
    if created:
        _nudge()
    out: dict[str, Any] = {"certificate_id": cid, "created": created}
    if wait:
        try:
            res = _wait_states(
                [cid],
                lambda st: st in ("ACTIVE", "FAILED", "REVOKED"),
                timeout,
                "issuing",
                stop_on_defer=exit_on_defer,
            )
        except Deferred as d:
            out.update(state="DEFERRED", waiting=d.waiting)
            if as_json:
                _print_json(out)
            else:
                console.print(f"{cid} requested: deferred ({_waiting_text(d.waiting)})")
            sys.exit(EXIT_DEFERRED)
        out["state"] = res[cid]
    if as_json:
        _print_json(out)
    else:  # one plain line (scripts read it; no terminal styling to load)
        click.echo(
            f"{cid} {'requested' if created else 'already requested'}"
            + (f": {out['state']}" if "state" in out else "")
        )
    if wait and out.get("state") == "FAILED":
        sys.exit(EXIT_FAILED)
    if wait and out.get("state") not in ("ACTIVE", "FAILED", "REVOKED"):
        sys.exit(EXIT_TIMEOUT)


def _issue_many(text: str, as_json: bool) -> None:
    """``issue --from-file``: every good line in one transaction and one dispatch; bad lines
    reported with their numbers (nothing written for them), exit code 2 if there were any."""
    from certqueue import bulk, operations
    from certqueue.config import get_settings
    from certqueue.db import session_scope

    good, bad = bulk.parse_file(text, get_settings())
    created_rows: list[dict[str, Any]] = []
    if good:
        with session_scope() as s:
            out = operations.request_issue_many(s, [req for _n, req in good], actor="cli")
            created_rows = [
                {"line": number, "certificate_id": cert.id, "created": created}
                for (number, _req), (cert, created) in zip(good, out, strict=True)
            ]
        if any(r["created"] for r in created_rows):
            _nudge()
    if as_json:
        _print_json(
            {
                "certificates": created_rows,
                "errors": [{"line": b.line, "field": b.field, "message": b.message} for b in bad],
            }
        )
    else:
        new = sum(1 for r in created_rows if r["created"])
        console.print(f"{new} certificate(s) requested, {len(created_rows) - new} already requested")
        for b in bad:
            err_console.print(f"line {b.line}: {b.message}", highlight=False, soft_wrap=True)
    if bad:
        sys.exit(EXIT_INPUT)


@main.command("renew")
@click.argument("certificate_ids", nargs=-1)
@click.option("--force", is_flag=True, help="Renew even if not due (only with ids).")
@click.option("--wait/--no-wait", default=False, help="Wait until each is renewed (or FAILED).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def renew_cmd(certificate_ids: Sequence[str], force: bool, wait: bool, timeout: float, as_json: bool) -> None:
    """Renew certificates (due ones only unless --force); with no ids, every certificate that is due
    (what beat's scan would claim next, now)."""
    from sqlalchemy import func, select

    from certqueue import certificates, dispatch, operations, validation
    from certqueue.db import session_scope
    from certqueue.models import Issuance, utcnow

    before: dict[str, int] = {}
    not_due: list[str] = []
    with session_scope() as s:  # one transaction: every request is recorded, or none
        if not certificate_ids:
            if force:
                raise InvalidInput("--force renews what is not due: name the certificates", field="force")
            certificate_ids = dispatch.due_ids(s, utcnow())
        for cid in certificate_ids:
            validation.validate_certificate_id(cid)
            if wait:  # renewed = a new issuance
                issued = select(func.count()).where(Issuance.certificate_id == cid)
                before[cid] = s.execute(issued).scalar_one()
            if operations.request_renew(s, cid, force=force, actor="cli") is None:
                not_due.append(cid)
    if len(not_due) < len(certificate_ids):
        _nudge()
    certificate_ids = [c for c in certificate_ids if c not in not_due]

    def report(renewed_ids: Sequence[str] | None = None) -> None:
        if as_json:
            out: dict[str, Any] = {"requested": list(certificate_ids), "not_due": not_due}
            if renewed_ids is not None:
                out["renewed"] = list(renewed_ids)
            _print_json(out)
            return
        for cid in not_due:
            click.echo(f"{cid} is not due for renewal (use --force)")
        if renewed_ids is None:
            click.echo(f"renewal requested for {len(certificate_ids)} certificate(s)")
        else:
            click.echo(f"renewed {len(renewed_ids)} certificate(s)")

    if not wait or not certificate_ids:
        report()
        return

    def renewed(cid: str) -> bool:
        with session_scope(write=False) as s:
            c = certificates.get(s, cid)
            n = s.execute(select(func.count()).where(Issuance.certificate_id == cid)).scalar_one()
            return bool(c.state == "ACTIVE" and n > before[cid]) or c.state in ("FAILED", "REVOKED")

    deadline = time.monotonic() + timeout
    pending = set(certificate_ids)
    while pending and time.monotonic() < deadline:
        pending = {c for c in pending if not renewed(c)}
        time.sleep(0.3)
    if pending:
        _fail(f"timed out waiting for {', '.join(sorted(pending))}", EXIT_TIMEOUT)
    report(certificate_ids)


@main.command("revoke")
@click.argument("certificate_id")
@click.option(
    "--reason",
    default="unspecified",
    show_default=True,
    help="RFC 5280 reason: unspecified, keyCompromise, superseded, cessationOfOperation, ...",
)
@click.option("--wait/--no-wait", default=False, help="Wait until the CA has revoked it.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def revoke_cmd(certificate_id: str, reason: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Revoke a certificate at its CA (RFC 5280 reason name)."""
    from certqueue import operations
    from certqueue.db import session_scope

    with session_scope() as s:
        intent = operations.request_revoke(s, certificate_id, reason=reason, actor="cli")
    out: dict[str, Any] = {"certificate_id": certificate_id, "reason": reason}
    if intent is None:
        out.update(requested=False, state="REVOKED")
        if as_json:
            _print_json(out)
        else:
            click.echo(f"{certificate_id} is already revoked")
        return
    out.update(requested=True, job_id=f"intent-{intent.id}")
    _nudge()
    if wait:
        res = _wait_states([certificate_id], lambda st: st == "REVOKED", timeout, "revoking")
        if res[certificate_id] != "REVOKED":
            _fail(f"{certificate_id} is {res[certificate_id]}", EXIT_TIMEOUT)
        out["state"] = "REVOKED"
    if as_json:
        _print_json(out)
    else:
        click.echo(f"revocation of {certificate_id} requested ({reason})")


@main.command("propagate")
@click.argument("certificate_id")
@click.option(
    "--region", "regions", multiple=True, help="Only this region (repeatable; default: its regions)."
)
@click.option("--force", is_flag=True, help="Redeploy even where the current issuance is deployed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def propagate_cmd(
    ctx: click.Context, certificate_id: str, regions: Sequence[str], force: bool, as_json: bool
) -> None:
    """Deploy a certificate's current issuance to its regions."""
    from certqueue import operations
    from certqueue.db import session_scope

    settings = ctx.obj["loaded"].settings
    with session_scope() as s:
        intent, targets = operations.request_propagate(
            s, certificate_id, regions=list(regions), force=force, actor="cli", settings=settings
        )
        job_id = f"intent-{intent.id}"
    _nudge()
    if as_json:
        _print_json({"certificate_id": certificate_id, "task_id": job_id, "regions": targets})
    else:
        console.print(f"propagation to {', '.join(targets)} requested (job {job_id})")


@main.command("import")
@click.option(
    "--cert",
    "cert_file",
    type=click.File("r"),
    required=True,
    help="The certificate (PEM; a fullchain.pem too).",
)
@click.option("--key", "key_file", type=click.File("r"), required=True, help="Its private key (PEM).")
@click.option("--chain", "chain_file", type=click.File("r"), help="The issuer chain (PEM), if not in --cert.")
@click.option("--region", "targets", multiple=True, help="Deploy to this region (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def import_cmd(cert_file: Any, key_file: Any, chain_file: Any, targets: Sequence[str], as_json: bool) -> None:
    """Import an externally issued certificate: monitored and propagated, never renewed."""
    from certqueue import operations
    from certqueue.db import session_scope

    with session_scope() as s:
        cert, intent = operations.import_certificate(
            s,
            certificate_pem=cert_file.read(),
            private_key_pem=key_file.read(),
            chain_pem=chain_file.read() if chain_file else None,
            targets=list(targets),
            actor="cli",
        )
        cid, state = cert.id, str(cert.state)
    if intent is not None:
        _nudge()
    if as_json:
        _print_json({"certificate_id": cid, "state": state, "regions": list(targets)})
    else:
        click.echo(f"imported {cid}")


@main.command("scan")
@click.option("--limit", type=int, help="Claim at most this many due renewals.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def scan_cmd(limit: int | None, as_json: bool) -> None:
    """Run dispatch now: claim pending requests and due renewals up to capacity (what beat does
    periodically), and mark expired certificates."""
    payload = [limit] if limit else []
    from certqueue.client import app_for_sending

    due = app_for_sending().send_task("certqueue.scan.due", args=payload, queue="scan")
    expire = app_for_sending().send_task("certqueue.scan.expire", queue="scan")
    if as_json:
        _print_json({"queued": {"certqueue.scan.due": due.id, "certqueue.scan.expire": expire.id}})
    else:
        click.echo("scan queued")


@main.command("export")
@click.argument("certificate_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "pkcs12"]),
    default="pem",
    show_default=True,
    help="pem: key, certificate and chain in one file; pkcs12: a .p12 bundle.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="File to write (mode 0600).",
)
@click.option("--password-env", metavar="VAR", help="PKCS#12: encrypt with the password in this variable.")
@click.option("--legacy", is_flag=True, help="PKCS#12: 3DES/SHA-1 for old consumers (default AES-256).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def export_cmd(
    certificate_id: str, fmt: str, out: Path, password_env: str | None, legacy: bool, force: bool
) -> None:
    """Write a certificate's served issuance with its private key to OUT (mode 0600).

    pem: the private key, the certificate and its chain in one file (what HAProxy and many servers
    load); pkcs12: a PFX bundle, encrypted with --password-env's password."""
    from certqueue import certificates, crypto
    from certqueue.db import session_scope
    from certqueue.models import Issuance

    password: bytes | None = None
    if password_env:
        if fmt != "pkcs12":
            raise InvalidInput("--password-env applies to --format pkcs12", field="password_env")
        value = os.environ.get(password_env)
        if not value:
            raise InvalidInput(f"environment variable {password_env} is empty", field="password_env")
        password = value.encode()
    if out.exists() and not force:
        raise InvalidInput(f"{out} exists (use --force to overwrite it)", field="out")
    if not out.parent.is_dir():
        raise InvalidInput(f"{out.parent} is not a directory", field="out")
    with session_scope(write=False) as s:
        c = certificates.get(s, certificate_id)
        if c.current_issuance_id is None:
            raise NotFound(f"{c.id} has no issued certificate yet ({c.state})")
        iss = s.get(Issuance, c.current_issuance_id)
        assert iss is not None
        key = certificates.decrypt_key(iss)
        cert_pem, chain_pem, serial = iss.cert_pem, iss.chain_pem, iss.serial
    if fmt == "pem":
        data = key + cert_pem.encode() + (chain_pem or "").encode()
    else:
        data = crypto.to_pkcs12(
            key, cert_pem, chain_pem or None, password, friendly_name=certificate_id, legacy=legacy
        )
    _write_private(out, data)
    console.print(f"wrote {out} ({fmt}, serial {serial}, mode 0600)", highlight=False)


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically, 0600 from the first byte (a temporary file renamed over ``path``)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@main.command("status")
@click.option("--due-within", default=24.0, show_default=True, help="Hours: renewals due within this.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status_cmd(ctx: click.Context, due_within: float, as_json: bool) -> None:
    """The fleet at a glance: certificates by state, renewals due soon, expiry health, rate-limit
    budgets and queue depths."""
    from sqlalchemy import func, select

    from certqueue.brokerstate import queue_depths
    from certqueue.db import session_scope
    from certqueue.health import certificate_health
    from certqueue.models import Certificate, RateBudget, State, utcnow

    settings = ctx.obj["loaded"].settings
    now = utcnow()
    with session_scope(write=False) as s:
        by_state = dict(
            s.execute(select(Certificate.state, func.count()).group_by(Certificate.state)).tuples().all()
        )
        due = s.execute(
            select(func.count()).where(
                Certificate.state == State.ACTIVE,
                Certificate.auto_renew.is_(True),
                Certificate.renew_at <= now + dt.timedelta(hours=due_within),
            )
        ).scalar_one()
        budgets: list[dict[str, Any]] = [
            {
                "key": b.key,
                "used": b.used,
                "limit": b.limit,
                "blocked_until": b.blocked_until.isoformat() if b.blocked_until else None,
            }
            for b in s.execute(select(RateBudget).order_by(RateBudget.key).limit(50)).scalars()
        ]
        waiting_rows = s.execute(
            select(Certificate)
            .where(
                Certificate.waiting_reason.is_not(None),
                Certificate.state.in_([State.REQUESTED, State.ISSUING, State.RENEWING]),
            )
            .order_by(Certificate.next_attempt_at)
            .limit(50)
        ).scalars()
        waiting = [{"id": c.id, "domains": c.domains, **(_waiting(c) or {})} for c in waiting_rows]
    health = certificate_health(now).as_dict()
    depths = queue_depths(settings)
    state_counts = {st.value: int(by_state.get(st.value, 0)) for st in State}
    data: dict[str, Any] = {
        "states": state_counts,
        "due_within_hours": due_within,
        "due": int(due),
        "health": health,
        "rate_limits": budgets,
        "waiting": waiting,
        "queues": depths,
        "broker": "up" if depths is not None else "unreachable",
    }
    if as_json:
        _print_json(data)
        return
    table = Table(title="certificates by state")
    table.add_column("state")
    table.add_column("count", justify="right")
    for st, n in state_counts.items():
        table.add_row(st, str(n))
    console.print(table)
    console.print(
        f"renewals due within {due_within:g} h: {due}; health: {health['status']} "
        f"({health['expiring_soon']} expiring within {health['threshold_days']:g} days, "
        f"{health['expired']} expired)",
        highlight=False,
    )
    if waiting:
        wt = Table(title=f"waiting ({len(waiting)})")
        for col in ("id", "names", "why"):
            wt.add_column(col, overflow="fold")
        for w in waiting:
            wt.add_row(w["id"], ", ".join(w["domains"][:3]), _waiting_text(w))
        console.print(wt)
    if budgets:
        bt = Table(title="rate-limit budgets")
        for col in ("key", "used", "limit", "blocked until"):
            bt.add_column(col)
        for b in budgets:
            bt.add_row(b["key"], str(b["used"]), f"{b['limit']:g}", b["blocked_until"] or "")
        console.print(bt)
    if depths is None:
        console.print("broker: unreachable")
    else:
        qt = Table(title="queues")
        qt.add_column("queue")
        qt.add_column("waiting", justify="right")
        for q, n in sorted(depths.items()):
            qt.add_row(q, str(n))
        console.print(qt)


# --- API tokens --------------------------------------------------------------------------------------


@main.group()
def tokens() -> None:
    """Bearer tokens for the REST API."""


@tokens.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(["read", "write", "admin"]),
    default=("read",),
    show_default=True,
    help="What the token may do (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tokens_create(name: str, scopes: Sequence[str], as_json: bool) -> None:
    """Create a token for NAME (who or what uses it). It is shown once; only its hash is stored."""
    from certqueue.db import session_scope
    from certqueue.tokens import create_token, normalize_scopes

    with session_scope() as s:
        token_id, plaintext = create_token(s, name, scopes)
    if as_json:
        _print_json({"id": token_id, "name": name, "scopes": normalize_scopes(scopes), "token": plaintext})
        return
    err_console.print(f"token {token_id} ({', '.join(normalize_scopes(scopes))}); shown once, store it now:")
    click.echo(plaintext)


@tokens.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tokens_list(include_revoked: bool, as_json: bool) -> None:
    """Tokens (never their values)."""
    from certqueue.db import session_scope
    from certqueue.tokens import list_tokens

    with session_scope(write=False) as s:
        rows: list[dict[str, Any]] = [
            {
                "id": t.id,
                "name": t.name,
                "scopes": list(t.scopes or []),
                "created_at": t.created_at.isoformat(),
                "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }
            for t in list_tokens(s, include_revoked=include_revoked)
        ]
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"API tokens ({len(rows)})")
    for col in ("id", "name", "scopes", "created", "last used", "revoked"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["id"],
            r["name"],
            ",".join(r["scopes"]),
            r["created_at"][:19],
            (r["last_used_at"] or "")[:19],
            (r["revoked_at"] or "")[:19],
        )
    console.print(table)


@tokens.command("revoke")
@click.argument("token_id")
def tokens_revoke(token_id: str) -> None:
    """Revoke a token (it stops working at once)."""
    from certqueue.db import session_scope
    from certqueue.tokens import revoke_token

    with session_scope() as s:
        revoke_token(s, token_id)
    console.print(f"revoked {token_id}")


# --- processes --------------------------------------------------------------------------------------


@main.command("worker")
@click.option(
    "--pool",
    type=click.Choice(["acme", "dns", "propagate", "all"]),
    required=True,
    help="Which queues it consumes (all: every pool, the embedded default).",
)
@click.option(
    "--region", "regions", multiple=True, help="propagate pool: the region(s) served, or `all` configured."
)
@click.option("--concurrency", "-c", type=int, help="Worker processes (default: the pool's setting).")
@click.option("--loglevel", default=None, help="Log level (default: logging.level).")
@click.option("--hostname", "-n", default=None, help="Celery node name (default: pool@host).")
def worker_cmd(
    pool: str, regions: Sequence[str], concurrency: int | None, loglevel: str | None, hostname: str | None
) -> None:
    """Run a worker pool."""
    from certqueue.workers import run_worker

    run_worker(pool, list(regions), concurrency=concurrency, loglevel=loglevel, hostname=hostname)


@main.command("beat")
@click.option("--loglevel", default=None, help="Log level (default: logging.level).")
def beat_cmd(loglevel: str | None) -> None:
    """Run the periodic scheduler (one active beat; a Redis lock with RedBeat)."""
    from certqueue.workers import run_beat

    run_beat(loglevel=loglevel)


@main.command("http01")
@click.option("--host", default=None, help="Default challenges.http_host.")
@click.option("--port", type=int, default=None, help="Default challenges.http_port.")
@click.pass_context
def http01_cmd(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve HTTP-01 challenge tokens from the database."""
    from certqueue.http01 import serve, serve_until_stopped, stop_on_signals

    c = ctx.obj["loaded"].settings.challenges
    stop = stop_on_signals()  # SIGTERM/SIGINT stop it, also as PID 1
    srv = serve(host or c.http_host, port or c.http_port)
    bound_host, bound_port = srv.server_address[0], srv.server_address[1]
    err_console.print(f"http01 responder on {bound_host!s}:{bound_port}")
    serve_until_stopped(srv, stop)


@main.command("serve")
@click.option("--host", default=None, help="Default api.host.")
@click.option("--port", type=int, default=None, help="Default api.port.")
def serve_cmd(host: str | None, port: int | None) -> None:
    """Run the REST API (with /health and /health/certificates) until interrupted; metrics are
    served by `certqueue metrics` on their own port."""
    from certqueue.api.app import serve

    serve(host, port)


@main.command("metrics")
@click.option("--host", default=None, help="Default monitoring.bind.")
@click.option("--port", type=int, default=None, help="Default monitoring.prometheus_port.")
@click.pass_context
def metrics_cmd(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve only the Prometheus /metrics endpoint (no REST API) until interrupted."""
    from certqueue.metrics import serve_metrics, stop_on_signals

    m = ctx.obj["loaded"].settings.monitoring
    stop = stop_on_signals()  # SIGTERM/SIGINT, also as PID 1; before the port opens
    server = serve_metrics(host, port, block=False)
    err_console.print(f"metrics on {host or m.bind}:{server.server_address[1]}/metrics")
    # short waits: the kernel may deliver SIGTERM to the server thread, and Python runs the handler
    # only when the main thread wakes up
    while not stop.wait(0.2):
        pass
    server.shutdown()


@main.command("demo")
@click.option("--keep", is_flag=True, help="Leave the stack running (Ctrl-C to stop).")
def demo_cmd(keep: bool) -> None:
    """Start a local stack (Pebble, responder, workers, beat), issue, renew and revoke real certificates."""
    from certqueue.demo import run_demo

    code = run_demo(keep=keep)
    sys.exit(code)


# command groups kept in their own modules (they register themselves on ``main``)
from certqueue import cli_accounts, cli_adopt, cli_events, cli_issuers, cli_responders  # noqa: E402, F401

if __name__ == "__main__":
    main()
