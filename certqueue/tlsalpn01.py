"""The TLS-ALPN-01 responder (RFC 8737): answers a CA's ``acme-tls/1`` handshake with the
validation certificate of the identifier its SNI names, from the database.

Like the HTTP-01 responder, any number of replicas can run behind a TCP load balancer: the key
authorizations live in ``tls_alpn01_tokens`` (``certqueue.challenge_tokens``), written by any acme
worker, so every replica answers every pending challenge. Each handshake reads the database once
(a validation certificate is made on the fly and kept for a few seconds per key authorization);
an unknown or expired name, or a lookup that fails, ends the handshake with an alert. The
connection is closed after the handshake: the CA only looks at the certificate.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from certqueue.acme.tlsalpn import ALPN_PROTOCOL, challenge_certificate, identifier_from_sni
from certqueue.db import session_scope
from certqueue.models import TlsAlpn01Token, utcnow

log = logging.getLogger("certqueue.tlsalpn01")

#: how long a validation context is reused for the same key authorization (seconds)
CONTEXT_TTL = 30.0
HANDSHAKE_TIMEOUT = 10.0


def lookup(identifier: str) -> str | None:
    """The key authorization of the newest unexpired pending challenge for ``identifier``."""
    if not identifier or len(identifier) > 255:
        return None
    now = utcnow()
    with session_scope(write=False) as s:
        row = s.execute(
            select(TlsAlpn01Token.key_authorization)
            .where(TlsAlpn01Token.identifier == identifier, TlsAlpn01Token.expires_at > now)
            .order_by(TlsAlpn01Token.created_at.desc())
            .limit(1)
        ).first()
    return str(row.key_authorization) if row is not None else None


class _Contexts:
    """SSL contexts per (identifier, key authorization): the certificate is made once per
    challenge, not per handshake. Files exist only while OpenSSL reads them (0600, private dir)."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._dir = Path(tempfile.mkdtemp(prefix="certqueue-tlsalpn-"))
        os.chmod(self._dir, 0o700)
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, ssl.SSLContext]] = {}

    def _new(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols([ALPN_PROTOCOL])
        return ctx

    def _load(self, ctx: ssl.SSLContext, identifier: str, key_authorization: str) -> None:
        cert = challenge_certificate(identifier, key_authorization, self._key, now=dt.datetime.now(dt.UTC))
        pem = cert.public_bytes(serialization.Encoding.PEM) + self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd, name = tempfile.mkstemp(dir=self._dir, suffix=".pem")
        try:
            os.write(fd, pem)
            os.close(fd)
            ctx.load_cert_chain(name)
        finally:
            os.unlink(name)

    def for_challenge(self, identifier: str, key_authorization: str) -> ssl.SSLContext:
        now = time.monotonic()
        with self._lock:
            for k in [k for k, (t, _) in self._cache.items() if now - t > CONTEXT_TTL]:
                del self._cache[k]
            hit = self._cache.get((identifier, key_authorization))
        if hit is not None:
            return hit[1]
        ctx = self._new()
        self._load(ctx, identifier, key_authorization)
        with self._lock:
            self._cache[(identifier, key_authorization)] = (now, ctx)
        return ctx

    def base(self) -> ssl.SSLContext:
        """The context a handshake starts with; the SNI callback swaps in a challenge's own."""
        ctx = self._new()
        self._load(ctx, "certqueue.invalid", "no-challenge")
        ctx.sni_callback = self._sni
        return ctx

    def _sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if not server_name:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        identifier = identifier_from_sni(server_name)
        try:
            key_authorization = lookup(identifier)
        except Exception:
            log.exception("tls-alpn-01: lookup failed")
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        if key_authorization is None:
            log.info("tls-alpn-01: no pending challenge for %s", identifier)
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = self.for_challenge(identifier, key_authorization)
        log.info("tls-alpn-01: presenting the challenge certificate for %s", identifier)
        return None

    def close(self) -> None:
        try:
            self._dir.rmdir()
        except OSError:
            pass


class _Handler(socketserver.BaseRequestHandler):
    server: TlsAlpn01Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            with self.server.base_context.wrap_socket(sock, server_side=True) as tls:
                self.server.handshakes += 1
                log.debug("tls-alpn-01: handshake done, alpn=%s", tls.selected_alpn_protocol())
        except (ssl.SSLError, OSError) as exc:
            log.debug("tls-alpn-01: handshake ended: %s", type(exc).__name__)


class TlsAlpn01Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int]) -> None:
        self.contexts = _Contexts()
        self.base_context = self.contexts.base()
        self.handshakes = 0
        super().__init__(address, _Handler)

    def server_close(self) -> None:
        super().server_close()
        self.contexts.close()


def serve(host: str, port: int) -> TlsAlpn01Server:
    return TlsAlpn01Server((host, port))
