"""A small authoritative DNS server (dnspython), UDP and TCP, on one loopback address and port.

It stands in for a second authoritative nameserver beside BIND (or for every nameserver, inside a
network namespace where BIND cannot run as ``nobody``). It serves the zones it is given from
``records``: ``(owner name, type) -> [rdata text]``, answers with the AA bit, NXDOMAIN for a name
of its zones it has no record for at all, NOERROR with no answer for another type, REFUSED outside
its zones. Recursion is never offered. ``records`` may be changed while it runs (``add``).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Records = dict[tuple[str, str], list[str]]


def _norm(name: str) -> str:
    return name.rstrip(".").lower() + "."


class FakeAuthority:
    def __init__(self, address: str, port: int, zones: tuple[str, ...], records: Records) -> None:
        self.address, self.port = address, port
        self.zones = tuple(_norm(z) for z in zones)
        self._lock = threading.Lock()
        self.records: Records = {(_norm(n), t.upper()): list(v) for (n, t), v in records.items()}
        self.queries: list[tuple[str, str]] = []
        self._servers: list[socketserver.BaseServer] = []

    def add(self, name: str, rdtype: str, value: str) -> None:
        with self._lock:
            self.records.setdefault((_norm(name), rdtype.upper()), []).append(value)

    # -- answering ------------------------------------------------------------------------------

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((name, rdtype))
            if not any(name == z or name.endswith("." + z) for z in self.zones):
                response.set_rcode(dns.rcode.REFUSED)
                response.flags &= ~dns.flags.AA
                return response.to_wire()
            values = self.records.get((name, rdtype))
            known = any(n == name for n, _ in self.records)
        if values:
            response.answer.append(dns.rrset.from_text_list(name, 60, dns.rdataclass.IN, rdtype, values))
        elif not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    # -- serving --------------------------------------------------------------------------------

    def start(self) -> FakeAuthority:
        fake = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                sock.sendto(fake.answer(data), self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                head = conn.recv(2)
                if len(head) < 2:
                    return
                size = int.from_bytes(head, "big")
                data = b""
                while len(data) < size:
                    chunk = conn.recv(size - len(data))
                    if not chunk:
                        return
                    data += chunk
                out = fake.answer(data)
                conn.sendall(len(out).to_bytes(2, "big") + out)

        class UdpServer(socketserver.ThreadingUDPServer):
            allow_reuse_address = True
            daemon_threads = True

        class TcpServer(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        for cls, handler in ((UdpServer, Udp), (TcpServer, Tcp)):
            cls.address_family = family
            server: Any = cls((self.address, self.port), handler)
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, name="fake-dns", daemon=True).start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> FakeAuthority:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
