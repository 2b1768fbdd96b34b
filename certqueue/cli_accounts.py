"""``certqueue accounts``: the ACME accounts (certqueue.acme.accounts): list, key rollover
(RFC 8555 section 7.3.5) and deactivation (section 7.3.6)."""

from __future__ import annotations

from typing import Any

import click

from certqueue.cli_ops import cli_actor as _cli_actor
from certqueue.cli_output import Column, output_option, render
from certqueue.logsafe import mask_url_password


@click.group()
def accounts() -> None:
    """ACME accounts: one per CA directory and contact."""


@accounts.command("list")
@output_option
def accounts_list(output: str) -> None:
    """Every account with its URL at the CA, status, key type and last key change."""
    from sqlalchemy import func, select

    from certqueue.db import session_scope
    from certqueue.models import Account, Order

    with session_scope(write=False) as s:
        # certificates that ordered through each account
        uses = dict(
            s.execute(
                select(Order.account_id, func.count(func.distinct(Order.certificate_id))).group_by(
                    Order.account_id
                )
            ).all()
        )
        rows: list[dict[str, Any]] = [
            {
                "id": a.id,
                "directory_url": mask_url_password(a.directory_url),
                "contact": a.contact,
                "account_url": a.account_url,
                "status": a.status,
                "key_type": a.key_type,
                "eab_kid": a.eab_kid,
                "created_at": a.created_at.isoformat(),
                "key_changed_at": a.key_changed_at.isoformat() if a.key_changed_at else None,
                "deactivated_at": a.deactivated_at.isoformat() if a.deactivated_at else None,
                "certificates": int(uses.get(a.id, 0)),
            }
            for a in s.execute(select(Account).order_by(Account.id)).scalars()
        ]
    columns = [
        Column("id", "id"),
        Column("directory", "directory_url"),
        Column("contact", "contact"),
        Column("account URL", "account_url"),
        Column("status", "status"),
        Column("key", "key_type"),
        Column("key changed", "key_changed_at", when=True),
        Column("certs", "certificates"),
        Column("EAB kid", "eab_kid", wide=True),
        Column("created", "created_at", wide=True, when=True),
        Column("deactivated", "deactivated_at", wide=True, when=True),
    ]
    render(rows, columns, output, title=f"ACME accounts ({len(rows)})")


@accounts.command("rollover")
@click.argument("account_id", type=int)
@click.option(
    "--key-type",
    type=click.Choice(["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"]),
    help="Type of the new key (default: the current key's type).",
)
@output_option
def accounts_rollover(account_id: int, key_type: str | None, output: str) -> None:
    """Give ACCOUNT_ID a new key at its CA; the new key is stored encrypted. Running it again after
    a failure finishes the interrupted rollover. Orders in flight carry on."""
    from certqueue.acme.accounts import rollover

    result = rollover(account_id, key_type=key_type, actor=_cli_actor())
    data = {
        "account_id": result.account_id,
        "rollover_id": result.rollover_id,
        "old_key_thumbprint": result.old_thumbprint,
        "new_key_thumbprint": result.new_thumbprint,
        "resumed": result.resumed,
    }
    if output in ("json", "tsv"):
        render([data], [Column(k, k) for k in data], output, data=data)
        return
    how = "finished the interrupted rollover" if result.resumed else "rolled over"
    click.echo(f"account {account_id}: {how}; key {result.old_thumbprint} -> {result.new_thumbprint}")


@accounts.command("deactivate")
@click.argument("account_id", type=int)
@click.option("--yes", is_flag=True, help="Confirm: the CA refuses the account for good.")
def accounts_deactivate(account_id: int, yes: bool) -> None:
    """Deactivate ACCOUNT_ID at its CA, for good (its certificates stay valid until they expire, but
    cannot be renewed or revoked through it)."""
    from certqueue.acme.accounts import deactivate_account
    from certqueue.errors import InvalidInput

    if not yes:
        raise InvalidInput("deactivation cannot be undone: add --yes", field="--yes")
    status = deactivate_account(account_id, actor=_cli_actor())
    click.echo(f"account {account_id}: {status}")
