"""One static file server for HTTP-01 on Pebble's HTTP port: ``python -m bench.webroot --port P --dir D``.

Serves ``D/.well-known/acme-challenge/<token>`` for every client that writes token files there (lego
with ``--http.webroot``, the bare acme loop): several processes cannot each bind the one port Pebble
validates against. Runs as its own process so its CPU can be measured. Loopback only.
"""

from __future__ import annotations

import argparse
import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args(argv)
    handler = functools.partial(_Quiet, directory=args.dir)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True
    print(f"webroot on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
