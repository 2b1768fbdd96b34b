"""``certqueue adopt``: bring certbot lineages and cert-manager TLS Secrets under management
(certqueue.adopt does the work; this is its face)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from certqueue.cli_ops import cli_actor, nudge
from certqueue.cli_output import EXIT_FAILED, Column, output_option, render


@click.group()
def adopt() -> None:
    """Bring existing certificates under management: served as they are, renewed through ACME."""


_dry_run = click.option("--dry-run", is_flag=True, help="Say what would be adopted; write nothing.")


@adopt.command("certbot")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@_dry_run
@output_option
@click.pass_context
def adopt_certbot(ctx: click.Context, directory: Path | None, dry_run: bool, output: str) -> None:
    """Adopt every lineage of a certbot DIRECTORY (DIRECTORY/renewal/*.conf; default /etc/letsencrypt)."""
    from certqueue import adopt as adopting

    _run(ctx, adopting.read_certbot(directory or adopting.DEFAULT_CERTBOT_DIR), dry_run, output)


@adopt.command("cert-manager")
@click.argument("file", type=click.File("r"))
@_dry_run
@output_option
@click.pass_context
def adopt_cert_manager(ctx: click.Context, file: Any, dry_run: bool, output: str) -> None:
    """Adopt the kubernetes.io/tls Secrets in FILE (`kubectl get secret -o json`; - for stdin)."""
    from certqueue import adopt as adopting

    _run(ctx, adopting.read_kubectl_json(file.read()), dry_run, output)


#: adopted certificates: id, expiry, names, then how they are renewed
_COLUMNS = (
    Column("id", "id"),
    Column("expires", "expires", when=True),
    Column("names", "domains", names=True),
    Column("challenge", "challenge"),
    Column("CA", "ca"),
    Column("source", "source", wide=True),
    Column("name", "name", wide=True),
    Column("state", "state", wide=True),
    Column("renew at", "renew_at", wide=True, when=True),
)


def _run(ctx: click.Context, candidates: list[Any], dry_run: bool, output: str) -> None:
    from certqueue import adopt as adopting

    settings = ctx.obj["loaded"].settings
    outcomes = adopting.adopt_all(candidates, settings=settings, actor=cli_actor(), dry_run=dry_run)
    failed = [o for o in outcomes if o.status == "failed"]
    if not dry_run and any(o.propagating for o in outcomes):
        nudge()  # dispatch relays the propagation intents
    if output == "json":
        render([], _COLUMNS, output, data={"dry_run": dry_run, "items": [o.to_json() for o in outcomes]})
    else:
        for o in outcomes:
            for note in o.notes:
                click.echo(f"{o.source} {o.name}: {note}", err=True)
            if o.error:
                click.echo(f"error: {o.source} {o.name}: {o.error}", err=True)
        done = [o for o in outcomes if o.status != "failed"]
        records = []
        for o in done:
            item = o.to_json()
            challenge = (o.challenge or "") + (f" ({o.dns_provider})" if o.dns_provider else "")
            records.append({**item, "id": o.certificate_id or "(dry run)", "challenge": challenge})
        title = "would adopt" if dry_run else "adopted"
        render(records, _COLUMNS, output, title=f"{title} ({len(done)} of {len(outcomes)})")
    if failed:
        sys.exit(EXIT_FAILED)
