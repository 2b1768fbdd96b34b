"""``certqueue issuers``: the configured issuers (certqueue.issuers), each with its account at the CA."""

from __future__ import annotations

from typing import Any

import click

from certqueue.cli import Table, _print_json, console, main


def _rows(settings: Any, only: str | None = None) -> list[dict[str, Any]]:
    from sqlalchemy import func, select

    from certqueue import issuers
    from certqueue.db import session_scope
    from certqueue.logsafe import mask_url_password
    from certqueue.models import Account, Certificate

    chosen = [issuers.get(settings, only)] if only else issuers.all_issuers(settings)
    out = []
    with session_scope(write=False) as s:
        for i in chosen:
            contact = i.email or ""
            acct = s.execute(
                select(Account).where(Account.directory_url == i.directory_url, Account.contact == contact)
            ).scalar_one_or_none()
            certs = s.execute(
                select(func.count())
                .select_from(Certificate)
                .where(Certificate.directory_url == i.directory_url)
            ).scalar_one()
            out.append(
                {
                    "name": i.name,
                    "directory_url": mask_url_password(i.directory_url),
                    "contact": i.email,
                    "account_key_type": i.account_key_type,
                    "eab_kid": i.eab_kid,
                    "profile": i.profile,
                    "key_type": i.key_type,
                    "preferred_chain": i.preferred_chain,
                    "rate_limits": i.rate_limits or "rate_limits.ca_rules",
                    "ip_identifier_profiles": list(i.ip_identifier_profiles),
                    "fallback": list(i.fallback),
                    "account_id": acct.id if acct else None,
                    "account_url": acct.account_url if acct else None,
                    "account_status": (acct.status if acct.account_url else "registering")
                    if acct
                    else "not registered",
                    "certificates": int(certs),
                }
            )
    return out


@main.group()
def issuers() -> None:
    """Named ACME issuers (the acme: section is the issuer "default")."""


@issuers.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def issuers_list(ctx: click.Context, as_json: bool) -> None:
    """Every issuer with its directory, contact, EAB key id, account URL and account status."""
    rows = _rows(ctx.obj["loaded"].settings)
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"issuers ({len(rows)})")
    for col in ("name", "directory", "contact", "EAB kid", "account URL", "status", "fallback", "certs"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            r["directory_url"],
            r["contact"] or "",
            r["eab_kid"] or "",
            r["account_url"] or "",
            r["account_status"],
            ", ".join(r["fallback"]),
            str(r["certificates"]),
        )
    console.print(table)


@issuers.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def issuers_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """One issuer: every setting (the EAB HMAC key never) and its account."""
    (row,) = _rows(ctx.obj["loaded"].settings, name)
    if as_json:
        _print_json(row)
        return
    for key, value in row.items():
        console.print(f"[bold]{key}[/]: {value if value not in (None, []) else '-'}", highlight=False)
