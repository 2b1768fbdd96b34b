"""``certqueue events``: the outbox of lifecycle events (certqueue.outbox): what was delivered,
what waits, the dead letters, and sending dead letters again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from certqueue import cli_output
from certqueue.cli_output import Column, output_option, render


@click.group()
def events() -> None:
    """Lifecycle events out to subscribers (webhooks, Celery tasks)."""


@events.command("list")
@click.option("--status", type=click.Choice(["pending", "delivered", "dead"]), help="Only this status.")
@click.option("--dead", is_flag=True, help="Only dead letters (the same as --status dead).")
@click.option("--subscriber", help="Only this subscriber.")
@click.option("--certificate", "certificate_id", help="Only this certificate.")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=50,
    show_default=True,
    help="At most this many.",
)
@output_option
def events_list(
    status: str | None,
    dead: bool,
    subscriber: str | None,
    certificate_id: str | None,
    limit: int,
    output: str,
) -> None:
    """Deliveries, newest first."""
    from sqlalchemy import select

    from certqueue.db import session_scope
    from certqueue.models import EventDelivery

    if dead:
        status = "dead"
    stmt = select(EventDelivery).order_by(EventDelivery.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(EventDelivery.status == status)
    if subscriber:
        stmt = stmt.where(EventDelivery.subscriber == subscriber)
    if certificate_id:
        stmt = stmt.where(EventDelivery.certificate_id == certificate_id)
    with session_scope(write=False) as s:
        rows: list[dict[str, Any]] = [
            {
                "id": d.id,
                "subscriber": d.subscriber,
                "type": d.event_type,
                "certificate_id": d.certificate_id,
                "idempotency_key": d.idempotency_key,
                "status": d.status,
                "attempts": d.attempts,
                "last_status": d.last_status,
                "last_error": d.last_error,
                "occurred_at": d.occurred_at.isoformat(),
                "next_attempt_at": d.next_attempt_at.isoformat() if d.status == "pending" else None,
                "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
            }
            for d in s.execute(stmt).scalars()
        ]
    columns = [
        Column("id", "id"),
        Column("subscriber", "subscriber"),
        Column("type", "type"),
        Column("certificate", "certificate_id"),
        Column("status", "status"),
        Column("attempts", "attempts"),
        Column("last error", "last_error"),
        Column("occurred", "occurred_at", when=True),
        Column("last status", "last_status", wide=True),
        Column("next attempt", "next_attempt_at", wide=True, when=True),
        Column("delivered", "delivered_at", wide=True, when=True),
        Column("idempotency key", "idempotency_key", wide=True),
    ]
    render(rows, columns, output, title=f"event deliveries ({len(rows)})")


@events.command("redeliver")
@click.argument("delivery_ids", nargs=-1, type=int)
@click.option("--dead", is_flag=True, help="Every dead letter.")
def events_redeliver(delivery_ids: Sequence[int], dead: bool) -> None:
    """Send deliveries again (dead letters, or DELIVERY_IDS) with a fresh attempt count; the
    idempotency key stays the same, so a receiver that did get one drops the copy."""
    from certqueue import outbox
    from certqueue.db import session_scope

    with session_scope() as s:
        n = outbox.redeliver(s, ids=list(delivery_ids) or None, dead=dead)
    cli_output.console.print(f"{n} deliveries due again")
