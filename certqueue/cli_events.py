"""``certqueue events``: the outbox of lifecycle events (certqueue.outbox): what was delivered,
what waits, the dead letters, and sending dead letters again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from certqueue.cli import Table, _print_json, console, main


@main.group()
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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def events_list(
    status: str | None,
    dead: bool,
    subscriber: str | None,
    certificate_id: str | None,
    limit: int,
    as_json: bool,
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
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"event deliveries ({len(rows)})")
    for col in ("id", "subscriber", "type", "certificate", "status", "attempts", "last error", "occurred"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["subscriber"],
            r["type"],
            r["certificate_id"] or "",
            r["status"],
            str(r["attempts"]),
            r["last_error"] or "",
            r["occurred_at"][:19],
        )
    console.print(table)


@events.command("redeliver")
@click.argument("delivery_ids", nargs=-1, type=int)
@click.option("--dead", is_flag=True, help="Every dead letter.")
def events_redeliver(delivery_ids: Sequence[int], dead: bool) -> None:
    """Send deliveries again (dead letters, or the given ids) with a fresh attempt count; the
    idempotency key stays the same, so a receiver that did get one drops the copy."""
    from certqueue import outbox
    from certqueue.db import session_scope

    with session_scope() as s:
        n = outbox.redeliver(s, ids=list(delivery_ids) or None, dead=dead)
    console.print(f"{n} deliveries due again")
