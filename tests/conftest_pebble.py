"""pytest plugin: a real Pebble CA with pebble-challtestsrv as its DNS, on loopback.

Register with ``-p tests.conftest_pebble`` (or ``pytest_plugins = ["tests.conftest_pebble"]``).

Fixtures:

* ``pebble`` (session): a :class:`PebbleStack`: Pebble resolving through pebble-challtestsrv (every
  name is 127.0.0.1), and an HTTP-01 responder on Pebble's ``httpPort`` that serves
  ``stack.http01.tokens`` (token -> key authorization). Tests put their tokens there.
* ``make_pebble`` (function): ``make_pebble(env=..., dns_server=..., http_port=..., eab_keys=...)``
  starts another Pebble (stopped at the end of the test). By default it validates through the session
  stack's DNS and HTTP-01 responder, so only the environment (``PEBBLE_WFE_NONCEREJECT``,
  ``PEBBLE_ALTERNATE_ROOTS``...) or the DNS server (BIND for DNS-01) needs saying.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devstack.pebble import ChallTestSrv, PebbleServer
from devstack.ports import free_port

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


class Http01Responder:
    """Serves ``tokens[token]`` at ``/.well-known/acme-challenge/<token>`` on 127.0.0.1:port."""

    def __init__(self, port: int = 0) -> None:
        self.tokens: dict[str, str] = {}
        self.requests: list[str] = []
        tokens, seen = self.tokens, self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                token = self.path[len(CHALLENGE_PREFIX) :] if self.path.startswith(CHALLENGE_PREFIX) else None
                body = tokens.get(token) if token else None
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="http01-responder", daemon=True)

    def start(self) -> Http01Responder:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class PebbleStack:
    server: PebbleServer
    dns: ChallTestSrv
    http01: Http01Responder

    @property
    def directory_url(self) -> str:
        return self.server.directory_url

    @property
    def ca_bundle(self) -> str:
        assert self.server.ca_bundle is not None
        return str(self.server.ca_bundle)

    @property
    def http_port(self) -> int:
        return self.http01.port


@pytest.fixture(scope="session")
def pebble() -> Iterator[PebbleStack]:
    responder = Http01Responder().start()
    dns = ChallTestSrv().start()
    try:
        server = PebbleServer(http_port=responder.port, dns_server=dns.dns_address).start()
    except BaseException:
        dns.stop()
        responder.stop()
        raise
    try:
        yield PebbleStack(server=server, dns=dns, http01=responder)
    finally:
        server.stop()
        dns.stop()
        responder.stop()


MakePebble = Callable[..., PebbleServer]


@pytest.fixture
def make_pebble(pebble: PebbleStack) -> Iterator[MakePebble]:
    started: list[PebbleServer] = []

    def make(
        env: dict[str, str] | None = None,
        dns_server: str | None = None,
        http_port: int | None = None,
        eab_keys: dict[str, str] | None = None,
    ) -> PebbleServer:
        server = PebbleServer(
            http_port=http_port or pebble.http_port,
            dns_server=dns_server or pebble.dns.dns_address,
            env=dict(env or {}),
            eab_keys=eab_keys,
        )
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


def ca_bundle_of(server: PebbleServer) -> str:
    assert server.ca_bundle is not None and Path(server.ca_bundle).exists()
    return str(server.ca_bundle)
