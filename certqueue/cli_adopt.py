"""``certqueue adopt``: bring certbot lineages and cert-manager TLS Secrets under management
(certqueue.adopt does the work; this is its face)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from certqueue.cli import EXIT_FAILED, Table, _cli_actor, _print_json, console, main


@main.group()
def adopt() -> None:
    """Bring existing certificates under management: served as they are, renewed through ACME."""


_dry_run = click.option("--dry-run", is_flag=True, help="Say what would be adopted; write nothing.")
_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@adopt.command("certbot")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@_dry_run
@_json
@click.pass_context
def adopt_certbot(ctx: click.Context, directory: Path | None, dry_run: bool, as_json: bool) -> None:
    """Adopt every lineage of a certbot directory (DIRECTORY/renewal/*.conf; default /etc/letsencrypt)."""
    from certqueue import adopt as adopting

    _run(ctx, adopting.read_certbot(directory or adopting.DEFAULT_CERTBOT_DIR), dry_run, as_json)


@adopt.command("cert-manager")
@click.argument("file", type=click.File("r"))
@_dry_run
@_json
@click.pass_context
def adopt_cert_manager(ctx: click.Context, file: Any, dry_run: bool, as_json: bool) -> None:
    """Adopt the kubernetes.io/tls Secrets in FILE (`kubectl get secret -o json`; - for stdin)."""
    from certqueue import adopt as adopting

    _run(ctx, adopting.read_kubectl_json(file.read()), dry_run, as_json)


def _run(ctx: click.Context, candidates: list[Any], dry_run: bool, as_json: bool) -> None:
    from certqueue import adopt as adopting
    from certqueue.cli import _nudge

    settings = ctx.obj["loaded"].settings
    outcomes = adopting.adopt_all(candidates, settings=settings, actor=_cli_actor(), dry_run=dry_run)
    failed = [o for o in outcomes if o.status == "failed"]
    if not dry_run and any(o.propagating for o in outcomes):
        _nudge()  # dispatch relays the propagation intents
    if as_json:
        _print_json({"dry_run": dry_run, "items": [o.to_json() for o in outcomes]})
    else:
        for o in outcomes:
            for note in o.notes:
                click.echo(f"{o.source} {o.name}: {note}", err=True)
            if o.error:
                click.echo(f"error: {o.source} {o.name}: {o.error}", err=True)
        done = [o for o in outcomes if o.status != "failed"]
        title = "would adopt" if dry_run else "adopted"
        table = Table(title=f"{title} ({len(done)} of {len(outcomes)})")
        table.add_column("id", no_wrap=True)
        for col in ("names", "expires", "challenge", "CA"):
            table.add_column(col, overflow="fold")
        for o in done:
            challenge = (o.challenge or "") + (f" ({o.dns_provider})" if o.dns_provider else "")
            expires = (o.expires or "")[:19].replace("T", " ")
            table.add_row(o.certificate_id or "(dry run)", ", ".join(o.domains), expires, challenge, o.ca)
        console.print(table)
    if failed:
        sys.exit(EXIT_FAILED)
