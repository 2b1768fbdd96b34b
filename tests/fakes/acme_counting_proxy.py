"""An HTTPS relay in front of Pebble that counts the ACME requests it passes on, newOrder above all.

"One order per certificate" counted in our own database misses an order the CA created but we never
stored (a worker that died between the CA's answer and the commit). This proxy counts at the CA's
door: every request is relayed to Pebble unchanged and counted by the directory resource it targets
(``newOrder``, ``newAccount``, ``newNonce``, ``revokeCert``, ``keyChange``) or, for every other URL, by
its first path segment (Pebble's ``/my-order/``, ``/authZ/``, ``/chalZ/``, ``/finalize-order/``,
``/certZ/``); newOrder also by the status Pebble answered (201 created, or the error).

Like :mod:`tests.fakes.acme_directory_proxy` (its model), the directory names the proxy's own URLs:
Pebble builds every URL from the Host header, which the proxy sets to its own address, so the JWS
``url`` a client signs names the proxy and matches what Pebble checks. Unlike it, this relay keeps no
request log (a storm passes a hundred thousand requests) and runs as its own process, so its CPU is
not the client's: ``python -m tests.fakes.acme_counting_proxy --upstream URL --ca FILE --workdir DIR``
prints ``counting proxy ready <directory url> <combined CA bundle>``; ``GET /counts`` answers the counts
as JSON (that path is the proxy's, not ACME's). :attr:`CountingProxy.combined_ca_bundle` trusts both
Pebble's CA and the proxy's.

``--guard-pebble-deadlock`` (:class:`Lanes`) keeps newOrder requests and authorization fetches
(``/authZ/``) from overlapping at Pebble; each kind still runs concurrently with its own kind. Pebble
2.4.0 deadlocks when they overlap under load (seen in a 10,000-certificate storm, goroutine dump in
docs/performance.md): an authz POST-as-GET holds that authorization's lock and asks the store's
read lock (``GetAccountByKey``); a newOrder waits for the store's write lock (``AddAuthorization``),
which blocks new readers; another newOrder holds the store's read lock in ``FindValidAuthorization``
and waits for the same authorization's lock. The guard is the proxy's behaviour, not the CA's, and
counted (``guard waits``).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from devstack.tls import make_server_tls

COUNTS_PATH = "/counts"
_UPSTREAM_TIMEOUT = 30.0
_RELAYED = ("Replay-Nonce", "Location", "Link", "Retry-After", "Content-Type", "Cache-Control")
_NAMED = ("newOrder", "newAccount", "newNonce", "revokeCert", "keyChange")


def classify(path: str, named_paths: dict[str, str]) -> str:
    """The counter a request path goes to: a directory resource's name, else ``/<first segment>/``."""
    for name, p in named_paths.items():
        if path == p:
            return name
    first = path.strip("/").split("/", 1)[0]
    return f"/{first}/" if first else "/"


class Lanes:
    """Requests of one lane run concurrently; requests of different lanes never overlap. Turns are
    taken in phases: while a request of another lane waits, new requests of the running lane wait
    too; when the lane is free, the other lane goes first and every request of it that was waiting
    enters together. A steady stream of one kind cannot starve the other."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._lane: str | None = None
        self._last: str | None = None
        self._running = 0
        self._admit = 0  # waiters of the running lane let in although the other lane waits
        self._waiting: Counter[str] = Counter()
        self.waits = 0

    def _try_enter(self, lane: str, waiting: bool) -> bool:
        others_wait = any(n for k, n in self._waiting.items() if k != lane)
        if self._running == 0 and (not others_wait or lane != self._last):
            self._lane = self._last = lane
            self._admit = self._waiting[lane] - (1 if waiting else 0)
        elif self._lane == lane and self._running > 0 and (not others_wait or self._admit > 0):
            if others_wait:
                self._admit -= 1
        else:
            return False
        self._running += 1
        return True

    @contextmanager
    def hold(self, lane: str) -> Iterator[None]:
        with self._cond:
            if not self._try_enter(lane, waiting=False):
                self.waits += 1
                self._waiting[lane] += 1
                try:
                    while not self._try_enter(lane, waiting=True):
                        self._cond.wait()
                finally:
                    self._waiting[lane] -= 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if self._running == 0:
                    self._lane = None
                    self._admit = 0
                self._cond.notify_all()


# the request kinds the guard keeps apart (see the module docstring); an account's order list
# (``/list-orderz/``, read to find an order whose URL was lost) holds the store's read lock while it
# takes every order's lock and reads their authorizations: the same cycle, so it has a lane too
GUARDED = ("newOrder", "/authZ/", "/list-orderz/")


class CountingProxy:
    def __init__(
        self,
        upstream_directory_url: str,
        upstream_ca_bundle: str | Path,
        workdir: Path,
        *,
        guard_pebble_deadlock: bool = False,
    ) -> None:
        self.upstream_directory_url = upstream_directory_url
        self.upstream_ca_bundle = str(upstream_ca_bundle)
        workdir.mkdir(parents=True, exist_ok=True)
        self._tls = make_server_tls(workdir / "counting-proxy-tls", label="certqueue counting proxy")
        self.combined_ca_bundle = workdir / "counting-proxy-combined-ca.pem"
        self.combined_ca_bundle.write_bytes(
            Path(self.upstream_ca_bundle).read_bytes() + self._tls.ca_cert.read_bytes()
        )
        up = urlsplit(upstream_directory_url)
        self._upstream_base = f"{up.scheme}://{up.netloc}"
        self._directory_path = up.path
        self._named: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.lanes = Lanes() if guard_pebble_deadlock else None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        #: an outage of the CA: while set, every request's connection is closed without an answer
        #: (open keep-alive connections too, which stopping the listener would not reach)
        self.down = False

    # -- what callers use ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def directory_url(self) -> str:
        return f"{self.url}{self._directory_path}"

    def counts(self) -> dict[str, int]:
        """Requests relayed, by counter (``newOrder``, ``newOrder 201``, ``/my-order/``, ...), and
        ``guard waits`` (requests the deadlock guard held back) when it is on."""
        with self._lock:
            out = dict(self._counts)
        if self.lanes is not None:
            out["guard waits"] = self.lanes.waits
        return out

    @property
    def new_orders(self) -> int:
        """newOrder requests Pebble answered 201 (an order it created)."""
        return self.counts().get("newOrder 201", 0)

    def start(self, port: int = 0) -> CountingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.down and urlsplit(self.path).path != COUNTS_PATH:
                    with proxy._lock:
                        proxy._counts["refused (CA down)"] += 1
                    self.close_connection = True  # no answer: the client sees the connection drop
                    return
                status, headers, content = proxy._handle(
                    self.command, self.path, body, self.headers.get("Content-Type")
                )
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)

            do_GET = do_POST = do_HEAD = _serve

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self._tls.cert), str(self._tls.key))
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="counting-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- relaying ------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            self._local.session = s
        return s

    def _learn_directory(self, directory: dict[str, Any]) -> None:
        named = {}
        for name in _NAMED:
            if isinstance(directory.get(name), str):
                named[name] = urlsplit(directory[name]).path
        with self._lock:
            self._named = named

    def _handle(
        self, method: str, raw_path: str, body: bytes, content_type: str | None
    ) -> tuple[int, dict[str, str], bytes]:
        path = urlsplit(raw_path).path
        if method == "GET" and path == COUNTS_PATH:
            return 200, {"Content-Type": "application/json"}, json.dumps(self.counts()).encode()
        if not self._named and path != self._directory_path:
            # a client that never read the directory here still gets counted right
            self._learn_directory(self._fetch_directory())
        kind = "directory" if path == self._directory_path else classify(path, self._named)
        headers = {"Host": f"127.0.0.1:{self.port}"}
        if content_type:
            headers["Content-Type"] = content_type
        guard = self.lanes.hold(kind) if self.lanes is not None and kind in GUARDED else _unguarded()
        try:
            with guard:
                up = self._session().request(
                    method,
                    f"{self._upstream_base}{raw_path}",
                    data=body or None,
                    headers=headers,
                    verify=self.upstream_ca_bundle,
                    timeout=_UPSTREAM_TIMEOUT,
                    allow_redirects=False,
                )
        except requests.RequestException as exc:
            with self._lock:
                self._counts[kind] += 1
                self._counts[f"{kind} upstream error"] += 1
            problem = {"type": "urn:ietf:params:acme:error:serverInternal", "detail": type(exc).__name__}
            return 502, {"Content-Type": "application/problem+json"}, json.dumps(problem).encode()
        with self._lock:
            self._counts[kind] += 1
            if kind == "newOrder":
                self._counts[f"newOrder {up.status_code}"] += 1
        if kind == "directory" and up.ok:
            try:
                self._learn_directory(up.json())
            except ValueError:
                pass
        relayed = {h: up.headers[h] for h in _RELAYED if h in up.headers}
        return up.status_code, relayed, up.content

    def _fetch_directory(self) -> dict[str, Any]:
        up = self._session().get(
            self.upstream_directory_url,
            headers={"Host": f"127.0.0.1:{self.port}"},
            verify=self.upstream_ca_bundle,
            timeout=_UPSTREAM_TIMEOUT,
        )
        up.raise_for_status()
        data: dict[str, Any] = up.json()
        return data


@contextmanager
def _unguarded() -> Iterator[None]:
    yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fakes.acme_counting_proxy")
    ap.add_argument("--upstream", required=True, help="Pebble's directory URL")
    ap.add_argument("--ca", required=True, help="the CA bundle Pebble's listener is signed by")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--guard-pebble-deadlock",
        action="store_true",
        help="never let newOrder and authorization fetches overlap at Pebble (its 2.4.0 deadlock)",
    )
    args = ap.parse_args(argv)
    proxy = CountingProxy(
        args.upstream, args.ca, Path(args.workdir), guard_pebble_deadlock=args.guard_pebble_deadlock
    ).start(args.port)
    print(f"counting proxy ready {proxy.directory_url} {proxy.combined_ca_bundle}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
