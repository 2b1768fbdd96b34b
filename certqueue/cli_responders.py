"""``certqueue tlsalpn01``: the TLS-ALPN-01 responder (certqueue.tlsalpn01); the HTTP-01 one is
``certqueue http01`` (certqueue.cli)."""

from __future__ import annotations

import click

from certqueue.cli_output import err_console


@click.command("tlsalpn01")
@click.option("--host", default=None, help="Address to bind (challenges.tls_alpn_host).")
@click.option("--port", type=int, default=None, help="Port (challenges.tls_alpn_port; the CA uses 443).")
@click.pass_context
def tlsalpn01_cmd(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Answer TLS-ALPN-01 (acme-tls/1) challenges from the database; run as many replicas as needed."""
    from certqueue.http01 import serve_until_stopped, stop_on_signals
    from certqueue.tlsalpn01 import serve

    c = ctx.obj["loaded"].settings.challenges
    stop = stop_on_signals()
    srv = serve(host or c.tls_alpn_host, port or c.tls_alpn_port)
    bound_host, bound_port = srv.server_address[0], srv.server_address[1]
    err_console.print(f"tls-alpn-01 responder on {bound_host!s}:{bound_port}")
    serve_until_stopped(srv, stop)
