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

from certqueue import (
    __version__,
    cli_accounts,
    cli_adopt,
    cli_events,
    cli_issuers,
    cli_output,
    cli_responders,
)
from certqueue.cli_ops import cli_actor as _cli_actor
from certqueue.cli_ops import nudge as _nudge
from certqueue.cli_output import (
    EXIT_DEFERRED,
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_NOT_FOUND,
    EXIT_TIMEOUT,
    Column,
    Table,
    err_console,
    output_option,
    print_inventory,
    print_tsv,
    render,
    waiting_text,
)
from certqueue.cli_output import fail as _fail
from certqueue.cli_output import print_json as _print_json
from certqueue.errors import (
    CertqueueError,
    ConfigError,
    InvalidInput,
    InvalidTransition,
    KeyStoreError,
    NotFound,
)


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
        except click.BadParameter as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if exc.param is not None and isinstance(exc.param.type, click.File | click.Path):
                # a file that is not there or cannot be read: one line, not click's usage page
                _fail(f"{exc.format_message()} (check the path and that it is readable)", EXIT_INPUT)
            raise
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except CertqueueError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = exc.message
            if isinstance(exc, NotFound):
                message += _not_found_hint(ctx.invoked_subcommand)
            _fail(message, _exit_code(exc))
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if _no_schema(exc):
                _discard_created_database(ctx)
                _fail(_no_schema_message(ctx), EXIT_INPUT)
            if isinstance(exc, ModuleNotFoundError):
                _fail(_missing_module_message(exc), EXIT_INPUT)
            if _unreachable_database(exc):
                _fail(_unreachable_database_message(ctx, exc), EXIT_FAILED)
            _fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", EXIT_FAILED)


#: where a command's ids are listed, for "no such id" errors
_LISTED_BY = {
    "tokens": "certqueue tokens list",
    "accounts": "certqueue accounts list",
    "events": "certqueue events list",
    "issuers": "certqueue issuers list",
}


def _not_found_hint(command: str | None) -> str:
    where = _LISTED_BY.get(command or "", "certqueue list")
    return f" (`{where}` shows what there is)"


def _unreachable_database(exc: BaseException) -> bool:
    from sqlalchemy.exc import OperationalError

    return isinstance(exc, OperationalError) and not _no_schema(exc)


def _unreachable_database_message(ctx: click.Context, exc: BaseException) -> str:
    from certqueue.logsafe import mask_url_password

    loaded = (ctx.obj or {}).get("loaded")
    url = mask_url_password(loaded.settings.database.url) if loaded is not None else "the database"
    detail = str(getattr(exc, "orig", exc)).strip().splitlines()  # the driver's first line says it
    return (
        f"cannot use {url}: {detail[0] if detail else type(exc).__name__} (is it running? point"
        " --database / CERTQUEUE_DATABASE__URL at the right one)"
    )


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


# --- config ---------------------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Settings."""


@config.command("show")
@output_option
@click.pass_context
def config_show(ctx: click.Context, output: str) -> None:
    """The merged settings, secrets masked, with the layer each value came from."""
    from certqueue.config import masked_dump

    dump = masked_dump(ctx.obj["loaded"])
    rules = _rate_limit_rules(ctx.obj["loaded"].settings)
    if output == "json":
        _print_json({**dump, "rate_limits.applied": {"value": rules, "source": "derived"}})
        return
    if output == "tsv":  # the settings; the rate limits per CA are config show -o json's
        records = [
            {"key": key, "value": json.dumps(item["value"], default=str), "source": item["source"]}
            for key, item in dump.items()
        ]
        print_tsv(records, [Column("key", "key"), Column("value", "value"), Column("source", "source")])
        return
    table = Table(title="certqueue settings", show_lines=False, markup=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_column("source", style="dim")
    for key, item in dump.items():
        table.add_row(key, json.dumps(item["value"], default=str), item["source"])
    cli_output.console.print(table)
    limits = Table(title="client-side rate limits per CA", show_lines=False, markup=False)
    for column in ("CA directory", "rules", "limits", "why"):
        limits.add_column(column, overflow="fold")
    for r in rules:
        text = (
            ", ".join(f"{k} {v}" for k, v in r["limits"].items() if v) or "none (the CA's own answers only)"
        )
        limits.add_row(r["directory"], r["rules"], text, r["source"])
    cli_output.console.print(limits)


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
    """Store runtime overrides (KEY=VALUE...) in the database; every worker sees them within seconds.

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
        cli_output.console.print(f"{key} = {json.dumps(value)} [dim](runtime, database)[/]", highlight=False)


@config.command("unset")
@click.argument("keys_", nargs=-1, required=True, metavar="KEY...")
def config_unset(keys_: Sequence[str]) -> None:
    """Remove runtime overrides (and any below KEY)."""
    from certqueue.runtime import clear_override

    removed = sum(clear_override(k, actor=_cli_actor()) for k in keys_)
    cli_output.console.print(f"removed {removed} runtime override(s)")


# --- database and keys ------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the schema (a no-op when current)."""
    from certqueue.migrate import upgrade

    rev = upgrade()
    cli_output.console.print(f"database at revision [bold]{rev}[/]")


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
        cli_output.console.print(f"key file {path} exists")
        return
    passphrase = os.environ.get(passphrase_env) if passphrase_env else None
    if passphrase_env and not passphrase:
        raise InvalidInput(f"environment variable {passphrase_env} is empty", field="passphrase")
    path.parent.mkdir(parents=True, exist_ok=True)
    kid = generate_key_file(path, passphrase=passphrase, overwrite=force)
    cli_output.console.print(f"wrote key file {path} (key id {kid}, mode 0600)")


@keys.command("rotate")
@click.option("--resume", is_flag=True, help="Re-encrypt what is left without adding a key.")
def keys_rotate(resume: bool) -> None:
    """Phase 1: add a new active key and re-encrypt every stored key under it (retires nothing).

    Running processes load the new key file by themselves within storage.key_check_seconds; then
    `certqueue keys retire` removes the old keys."""
    from certqueue.keyrotation import rotate

    rep = rotate(resume_only=resume)
    cli_output.console.print(
        f"active key {rep.new_kid or '(unchanged)'}; re-encrypted {rep.reencrypted} records; "
        f"old keys still in the file: {', '.join(rep.old_kids) or 'none'}"
        + ("; run `certqueue keys retire` once every process has loaded the new key" if rep.old_kids else "")
    )


@keys.command("retire")
def keys_retire() -> None:
    """Phase 2: remove old keys from the key file; refused while a row or a live process uses one."""
    from certqueue.keyrotation import retire

    removed = retire()
    cli_output.console.print(
        f"retired {', '.join(removed) or 'nothing (only the active key is in the file)'}"
    )


@keys.command("status")
@output_option
@click.pass_context
def keys_status(ctx: click.Context, output: str) -> None:
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
    if output == "json":
        _print_json(data)
        return
    if output == "tsv":  # one line per key in the file
        records = [
            {"key": kid, "active": kid == data["active"], "rows_under": kid in data["rows_under"]}
            for kid in data["keys"]
        ]
        print_tsv(records, [Column(k, k) for k in ("key", "active", "rows_under")])
        return
    cli_output.console.print(f"active key {data['active']}; keys in the file: {', '.join(data['keys'])}")
    cli_output.console.print(f"rows are under: {', '.join(data['rows_under']) or 'none'}")
    for p in data["processes"]:
        cli_output.console.print(f"  {p['process']} ({p['role']}): {p['active_kid']}", highlight=False)
    for why in data["retire_blocked_by"]:
        cli_output.console.print(f"[yellow]retire blocked:[/] {why}", highlight=False)


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


@main.command("list")
@click.option("--state", "states_in", multiple=True, help="Only these states (repeatable).")
@click.option("--domain", help="Only certificates naming this domain.")
@click.option("--limit", default=100, show_default=True, help="At most this many certificates.")
@click.option("--offset", default=0, help="Skip this many first (with --limit: pages).")
@output_option
def list_cmd(states_in: Sequence[str], domain: str | None, limit: int, offset: int, output: str) -> None:
    """The inventory: id, state, expiry and names (-o wide: also the CA, challenge, renewal time and
    any deferral)."""
    from certqueue import inventory
    from certqueue.db import session_scope

    with session_scope(write=False) as s:
        found = inventory.list_certificates(
            s, states_in=[x.upper() for x in states_in] or None, domain=domain, limit=limit, offset=offset
        )
        rows = [_cert_row(c) for c in found]
        cas = [_ca_of(c.directory_url) for c in found]
    if output == "json":
        _print_json(rows)
    else:
        print_inventory([{**r, "ca": ca} for r, ca in zip(rows, cas, strict=True)], output)


def _ca_of(directory_url: str | None) -> str:
    """A CA as its directory's host (a URL's path and any credentials stay out of tables)."""
    from urllib.parse import urlsplit

    if not directory_url:
        return ""
    parts = urlsplit(directory_url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else ""


@main.command("show")
@click.argument("certificate_id")
@output_option
def show_cmd(certificate_id: str, output: str) -> None:
    """One certificate, CERTIFICATE_ID (cert_...), with its issuances, deployments and recent events."""
    from sqlalchemy import select

    from certqueue import inventory
    from certqueue.db import session_scope
    from certqueue.models import Deployment, Event, Issuance

    with session_scope(write=False) as s:
        c = inventory.get(s, certificate_id)
        data = _cert_row(c)
        ca = _ca_of(c.directory_url)
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
    _print_certificate(data, ca, output)


def _print_certificate(data: dict[str, Any], ca: str, output: str) -> None:
    """``show``: the certificate's fields, then its issuances, deployments and events."""
    record = cli_output.certificate_record(data, ca)
    if output in ("json", "tsv"):
        render([record], cli_output.CERTIFICATE_COLUMNS, output, data=data)
        return
    wide = output == "wide"
    for column in cli_output.CERTIFICATE_COLUMNS:
        if column.wide and not wide:
            continue
        value = record.get(column.key)
        text = ", ".join(value) if isinstance(value, list) else "" if value is None else str(value)
        click.echo(f"{column.header}: {text}")
    extra = ["serial", "last_error"] + (["external", "ari_window"] if wide else [])
    for key in extra:
        if data.get(key) is not None:
            click.echo(f"{key.replace('_', ' ')}: {cli_output.value_text(data[key])}")
    parts = [
        (
            "issuances",
            ("id", "serial", "not_before", "not_after", "revoked", *(("fingerprint",) if wide else ())),
        ),
        ("deployments", ("region", "status", "ref", "attempts", "error")),
        ("events", ("at", "kind", "from", "to", "reason")),
    ]
    for name, keys in parts:
        if data[name]:
            columns = [
                Column(k.replace("_", " "), k, when=k in ("at", "not_before", "not_after")) for k in keys
            ]
            render(data[name], columns, output, title=f"{name} ({len(data[name])})")


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
                    if w and told.get(cid) != waiting_text(w):
                        told[cid] = waiting_text(w)
                        deferred.append((cid, w))
            for cid, w in deferred:
                progress.console.print(f"{cid} waiting: {waiting_text(w)}", style="yellow")
                if stop_on_defer:
                    raise Deferred(cid, w)
            finished = sum(1 for v in result.values() if done(v))
            progress.update(task, completed=finished)
            if finished == len(ids) or time.monotonic() > deadline:
                return result
            time.sleep(0.2)


_ISSUED_COLUMNS = (
    Column("certificate_id", "certificate_id"),
    Column("created", "created"),
    Column("state", "state"),
)


_REVOKED_COLUMNS = (
    Column("certificate_id", "certificate_id"),
    Column("reason", "reason"),
    Column("requested", "requested"),
    Column("state", "state"),
)


def _answer(output: str, data: dict[str, Any], columns: Sequence[Column], text: str) -> None:
    """A request's answer: ``data`` as JSON, one TSV record, or ``text`` (one plain line)."""
    if output == "json":
        _print_json(data)
    elif output == "tsv":
        print_tsv([data], columns)
    else:
        click.echo(text)


_staging_option = click.option(
    "--staging",
    is_flag=True,
    help="Use the CA's staging directory (Let's Encrypt staging for Let's Encrypt); a CA with no"
    " known staging twin is refused.",
)
_dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Run the whole ACME exchange now against the staging directory (or, for a CA without one,"
    " the configured directory) with the configured challenge solver, and store nothing.",
)


def _on_staging(req: Any) -> Any:
    """``req`` ordered from its CA's staging directory, with no fallback (a fallback CA would issue
    a trusted certificate the user did not ask for)."""
    import dataclasses

    from certqueue.cli_dryrun import staging_directory

    return dataclasses.replace(
        req, directory_url=staging_directory(req.directory_url), fallback_directory_urls=[]
    )


def _dry_run(reqs: Sequence[Any], *, staging: bool, output: str) -> None:
    _dry_run_renewals([None] * len(reqs), reqs, staging=staging, output=output)


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
@_staging_option
@_dry_run_option
@output_option
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
    staging: bool,
    dry_run: bool,
    output: str,
) -> None:
    """Request a certificate for DOMAINS (one certificate, all names), or many with --from-file.

    With --dry-run nothing is requested: the order is run against the CA's staging directory now,
    its challenges answered, and nothing is stored."""
    from certqueue import certificates
    from certqueue.db import session_scope

    if from_file is not None:
        if domains:
            raise InvalidInput("give DOMAINS or --from-file, not both", field="domains")
        if staging or dry_run:
            raise InvalidInput("--staging and --dry-run take DOMAINS, not --from-file", field="from_file")
        _issue_many(from_file.read(), output)
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
    if dry_run:
        _dry_run([req], staging=staging, output=output)
        return
    if staging:
        req = _on_staging(req)
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
            _answer(output, out, _ISSUED_COLUMNS, f"{cid} requested: deferred ({waiting_text(d.waiting)})")
            sys.exit(EXIT_DEFERRED)
        out["state"] = res[cid]
    # one plain line (scripts read it; no terminal styling to load)
    text = f"{cid} {'requested' if created else 'already requested'}"
    _answer(output, out, _ISSUED_COLUMNS, text + (f": {out['state']}" if "state" in out else ""))
    if wait and out.get("state") == "FAILED":
        sys.exit(EXIT_FAILED)
    if wait and out.get("state") not in ("ACTIVE", "FAILED", "REVOKED"):
        sys.exit(EXIT_TIMEOUT)


def _issue_many(text: str, output: str) -> None:
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
    errors = [{"line": b.line, "field": b.field, "message": b.message} for b in bad]
    if output == "json":
        _print_json({"certificates": created_rows, "errors": errors})
    elif output == "tsv":
        print_tsv(created_rows, [Column(k, k) for k in ("line", "certificate_id", "created")])
        for b in bad:
            click.echo(f"line {b.line}: {b.message}", err=True)
    else:
        new = sum(1 for r in created_rows if r["created"])
        cli_output.console.print(
            f"{new} certificate(s) requested, {len(created_rows) - new} already requested"
        )
        for b in bad:
            err_console.print(f"line {b.line}: {b.message}", highlight=False, soft_wrap=True)
    if bad:
        sys.exit(EXIT_INPUT)


@main.command("renew")
@click.argument("certificate_ids", nargs=-1)
@click.option("--force", is_flag=True, help="Renew even if not due (only with ids).")
@click.option("--wait/--no-wait", default=False, help="Wait until each is renewed (or FAILED).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.option(
    "--staging",
    is_flag=True,
    help="With --dry-run: refuse a CA with no known staging directory instead of ordering from its"
    " configured one.",
)
@_dry_run_option
@output_option
def renew_cmd(
    certificate_ids: Sequence[str],
    force: bool,
    wait: bool,
    timeout: float,
    staging: bool,
    dry_run: bool,
    output: str,
) -> None:
    """Renew CERTIFICATE_IDS (due ones only unless --force); with no ids, every certificate that is
    due (ACTIVE, renewed automatically, issued here, its renewal time reached: what beat's scan would
    claim next), now. It prints what it asked to renew.

    With --dry-run nothing is requested: each one is ordered now from its CA's staging directory with
    its names, key type and challenges, and nothing is stored."""
    from sqlalchemy import func, select

    from certqueue import certificates, operations, validation
    from certqueue.cli_ops import due_for_renewal
    from certqueue.db import session_scope
    from certqueue.models import Issuance

    if staging and not dry_run:
        raise InvalidInput(
            "renew --staging needs --dry-run: a staging certificate would replace the one served",
            field="staging",
        )
    if dry_run:
        if wait or force:
            raise InvalidInput("--dry-run runs now: without --wait or --force", field="dry_run")
        with session_scope(write=False) as s:
            ids = list(certificate_ids) or due_for_renewal(s)
            reqs = [_renewal_request(s, cid) for cid in ids]
        if not reqs:
            _answer(output, {"requested": [], "not_due": []}, (), "no certificate is due for renewal")
            return
        _dry_run_renewals(ids, reqs, staging=staging, output=output)
        return
    before: dict[str, int] = {}
    not_due: list[str] = []
    asked = bool(certificate_ids)
    with session_scope() as s:  # one transaction: every request is recorded, or none
        if not certificate_ids:
            if force:
                raise InvalidInput("--force renews what is not due: name the certificates", field="force")
            certificate_ids = due_for_renewal(s)
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
        data: dict[str, Any] = {"requested": list(certificate_ids), "not_due": not_due}
        if renewed_ids is not None:
            data["renewed"] = list(renewed_ids)
        if output == "json":
            _print_json(data)
            return
        if output == "tsv":
            records = [
                {"certificate_id": c, "result": "renewed" if renewed_ids is not None else "requested"}
                for c in certificate_ids
            ] + [{"certificate_id": c, "result": "not due"} for c in not_due]
            print_tsv(records, [Column("certificate_id", "certificate_id"), Column("result", "result")])
            return
        for cid in not_due:
            click.echo(f"{cid} is not due for renewal (use --force)")
        for cid in certificate_ids:
            click.echo(f"{cid} {'renewed' if renewed_ids is not None else 'renewal requested'}")
        if renewed_ids is None and not asked and not certificate_ids:
            click.echo("no certificate is due for renewal")
        elif renewed_ids is None:
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


def _renewal_request(session: Any, certificate_id: str) -> Any:
    """What renewing ``certificate_id`` would order: its names, key, challenges and CA."""
    from certqueue import certificates, validation

    validation.validate_certificate_id(certificate_id)
    c = certificates.get(session, certificate_id)
    if c.external:
        raise InvalidInput(f"{c.id} was imported; renew it where it was issued", field="certificate_id")
    return certificates.CertificateRequest(
        domains=list(c.domains),
        email=c.email,
        key_type=c.key_type,
        challenge_type=c.challenge_type,
        challenge_map=dict(c.challenge_map or {}),
        dns_provider=c.dns_provider,
        profile=c.profile,
        directory_url=c.directory_url,
        organization=c.organization,
        country=c.country,
        state=c.state_province,
        locality=c.locality,
    )


def _dry_run_renewals(ids: Sequence[str | None], reqs: Sequence[Any], *, staging: bool, output: str) -> None:
    from certqueue.cli_dryrun import dry_run, report

    results = [dry_run(r, staging=staging, certificate_id=cid) for cid, r in zip(ids, reqs, strict=True)]
    report(results, output)
    if any(not r.ok for r in results):
        sys.exit(EXIT_FAILED)


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
@output_option
def revoke_cmd(certificate_id: str, reason: str, wait: bool, timeout: float, output: str) -> None:
    """Revoke CERTIFICATE_ID (cert_...) at its CA (RFC 5280 reason name)."""
    from certqueue import operations
    from certqueue.db import session_scope

    with session_scope() as s:
        intent = operations.request_revoke(s, certificate_id, reason=reason, actor="cli")
    answer: dict[str, Any] = {"certificate_id": certificate_id, "reason": reason}
    if intent is None:
        answer.update(requested=False, state="REVOKED")
        _answer(output, answer, _REVOKED_COLUMNS, f"{certificate_id} is already revoked")
        return
    answer.update(requested=True, job_id=f"intent-{intent.id}")
    _nudge()
    if wait:
        res = _wait_states([certificate_id], lambda st: st == "REVOKED", timeout, "revoking")
        if res[certificate_id] != "REVOKED":
            _fail(f"{certificate_id} is {res[certificate_id]}", EXIT_TIMEOUT)
        answer["state"] = "REVOKED"
    _answer(output, answer, _REVOKED_COLUMNS, f"revocation of {certificate_id} requested ({reason})")


@main.command("propagate")
@click.argument("certificate_id")
@click.option(
    "--region", "regions", multiple=True, help="Only this region (repeatable; default: its regions)."
)
@click.option("--force", is_flag=True, help="Redeploy even where the current issuance is deployed.")
@output_option
@click.pass_context
def propagate_cmd(
    ctx: click.Context, certificate_id: str, regions: Sequence[str], force: bool, output: str
) -> None:
    """Deploy CERTIFICATE_ID's (cert_...) current issuance to its regions."""
    from certqueue import operations
    from certqueue.db import session_scope

    settings = ctx.obj["loaded"].settings
    with session_scope() as s:
        intent, targets = operations.request_propagate(
            s, certificate_id, regions=list(regions), force=force, actor="cli", settings=settings
        )
        job_id = f"intent-{intent.id}"
    _nudge()
    _answer(
        output,
        {"certificate_id": certificate_id, "task_id": job_id, "regions": targets},
        [Column(k, k) for k in ("certificate_id", "task_id", "regions")],
        f"propagation to {', '.join(targets)} requested (job {job_id})",
    )


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
@output_option
def import_cmd(cert_file: Any, key_file: Any, chain_file: Any, targets: Sequence[str], output: str) -> None:
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
    _answer(
        output,
        {"certificate_id": cid, "state": state, "regions": list(targets)},
        [Column(k, k) for k in ("certificate_id", "state", "regions")],
        f"imported {cid}",
    )


@main.command("scan")
@click.option("--limit", type=int, help="Claim at most this many due renewals.")
@output_option
def scan_cmd(limit: int | None, output: str) -> None:
    """Run dispatch now: claim pending requests and due renewals up to capacity (what beat does
    periodically), and mark expired certificates."""
    payload = [limit] if limit else []
    from certqueue.client import app_for_sending

    due = app_for_sending().send_task("certqueue.scan.due", args=payload, queue="scan")
    expire = app_for_sending().send_task("certqueue.scan.expire", queue="scan")
    queued = {"certqueue.scan.due": due.id, "certqueue.scan.expire": expire.id}
    if output == "json":
        _print_json({"queued": queued})
    elif output == "tsv":
        records = [{"task": name, "id": task_id} for name, task_id in queued.items()]
        print_tsv(records, [Column("task", "task"), Column("id", "id")])
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
    """Write CERTIFICATE_ID's served issuance with its private key to OUT (mode 0600).

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
    cli_output.console.print(f"wrote {out} ({fmt}, serial {serial}, mode 0600)", highlight=False)


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
@output_option
@click.pass_context
def status_cmd(ctx: click.Context, due_within: float, output: str) -> None:
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
    if output == "json":
        _print_json(data)
        return
    if output == "tsv":  # the counts by state, then the due renewals (-o json has the rest)
        records = [{"state": st, "count": n} for st, n in state_counts.items()]
        records.append({"state": f"due within {due_within:g} h", "count": due})
        print_tsv(records, [Column("state", "state"), Column("count", "count")])
        return
    table = Table(title="certificates by state")
    table.add_column("state")
    table.add_column("count", justify="right")
    for st, n in state_counts.items():
        table.add_row(st, str(n))
    cli_output.console.print(table)
    cli_output.console.print(
        f"renewals due within {due_within:g} h: {due}; health: {health['status']} "
        f"({health['expiring_soon']} expiring within {health['threshold_days']:g} days, "
        f"{health['expired']} expired)",
        highlight=False,
    )
    if waiting:
        wt = Table(title=f"waiting ({len(waiting)})", markup=False)
        for col in ("id", "names", "why"):
            wt.add_column(col, overflow="fold")
        for w in waiting:
            wt.add_row(w["id"], ", ".join(w["domains"][:3]), waiting_text(w))
        cli_output.console.print(wt)
    if budgets:
        bt = Table(title="rate-limit budgets")
        for col in ("key", "used", "limit", "blocked until"):
            bt.add_column(col)
        for b in budgets:
            bt.add_row(b["key"], str(b["used"]), f"{b['limit']:g}", b["blocked_until"] or "")
        cli_output.console.print(bt)
    if depths is None:
        cli_output.console.print("broker: unreachable")
    else:
        qt = Table(title="queues")
        qt.add_column("queue")
        qt.add_column("waiting", justify="right")
        for q, n in sorted(depths.items()):
            qt.add_row(q, str(n))
        cli_output.console.print(qt)


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
@output_option
def tokens_create(name: str, scopes: Sequence[str], output: str) -> None:
    """Create a token for NAME (who or what uses it). It is shown once; only its hash is stored."""
    from certqueue.db import session_scope
    from certqueue.tokens import create_token, normalize_scopes

    with session_scope() as s:
        token_id, plaintext = create_token(s, name, scopes)
    data = {"id": token_id, "name": name, "scopes": normalize_scopes(scopes), "token": plaintext}
    if output in ("json", "tsv"):
        render([data], [Column(k, k) for k in ("id", "name", "scopes", "token")], output, data=data)
        return
    err_console.print(f"token {token_id} ({', '.join(normalize_scopes(scopes))}); shown once, store it now:")
    click.echo(plaintext)


@tokens.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@output_option
def tokens_list(include_revoked: bool, output: str) -> None:
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
    columns = [
        Column("id", "id"),
        Column("name", "name"),
        Column("scopes", "scopes"),
        Column("created", "created_at", when=True),
        Column("last used", "last_used_at", when=True),
        Column("revoked", "revoked_at", when=True),
    ]
    render(rows, columns, output, title=f"API tokens ({len(rows)})")


@tokens.command("revoke")
@click.argument("token_id")
def tokens_revoke(token_id: str) -> None:
    """Revoke TOKEN_ID (tok_...; `certqueue tokens list`): it stops working at once."""
    from certqueue.db import session_scope
    from certqueue.tokens import revoke_token

    with session_scope() as s:
        revoke_token(s, token_id)
    cli_output.console.print(f"revoked {token_id}")


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


# command groups kept in their own modules, which import nothing from this one
for _command in (
    cli_accounts.accounts,
    cli_adopt.adopt,
    cli_events.events,
    cli_issuers.issuers,
    cli_responders.tlsalpn01_cmd,
):
    main.add_command(_command)

if __name__ == "__main__":
    main()
