"""``certqueue issuers``: the configured issuers (certqueue.issuers), each with its account at the CA."""

from __future__ import annotations

from typing import Any

import click

from certqueue.cli_output import Column, output_option, print_tsv, render
from certqueue.cli_output import print_json as _print_json


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


@click.group()
def issuers() -> None:
    """Named ACME issuers (the acme: section is the issuer "default")."""


@issuers.command("list")
@output_option
@click.pass_context
def issuers_list(ctx: click.Context, output: str) -> None:
    """Every issuer with its directory, contact, EAB key id, account URL and account status."""
    rows = _rows(ctx.obj["loaded"].settings)
    columns = [
        Column("name", "name"),
        Column("directory", "directory_url"),
        Column("contact", "contact"),
        Column("EAB kid", "eab_kid"),
        Column("account URL", "account_url"),
        Column("status", "account_status"),
        Column("fallback", "fallback"),
        Column("certs", "certificates"),
        Column("profile", "profile", wide=True),
        Column("key type", "key_type", wide=True),
        Column("account key type", "account_key_type", wide=True),
        Column("preferred chain", "preferred_chain", wide=True),
        Column("rate limits", "rate_limits", wide=True),
    ]
    render(rows, columns, output, title=f"issuers ({len(rows)})")


@issuers.command("show")
@click.argument("name")
@output_option
@click.pass_context
def issuers_show(ctx: click.Context, name: str, output: str) -> None:
    """NAME (an issuer of `certqueue issuers list`): every setting (the EAB HMAC key never) and its
    account."""
    (row,) = _rows(ctx.obj["loaded"].settings, name)
    if output == "json":
        _print_json(row)
    elif output == "tsv":
        print_tsv([row], [Column(k, k) for k in row])
    else:
        for key, value in row.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            click.echo(f"{key}: {shown if shown not in (None, '') else '-'}")
