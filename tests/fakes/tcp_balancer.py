"""A round-robin TCP load balancer (layer 4) for the responder-replica tests: each accepted
connection goes to the next backend in turn and is relayed both ways; ``connections`` counts them
per backend port."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from itertools import cycle


class TcpBalancer:
    def __init__(self, listen_port: int, backends: list[int], host: str = "127.0.0.1") -> None:
        self.connections: Counter[int] = Counter()
        self._backends = cycle(backends)
        self._lock = threading.Lock()
        self._sock = socket.create_server((host, listen_port), reuse_port=False)
        self._host = host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> TcpBalancer:
        self._thread.start()
        return self

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                port = next(self._backends)
                self.connections[port] += 1
            threading.Thread(target=self._relay, args=(client, port), daemon=True).start()

    def _relay(self, client: socket.socket, port: int) -> None:
        try:
            upstream = socket.create_connection((self._host, port), timeout=10)
        except OSError:
            client.close()
            return

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        t = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        t.start()
        pump(client, upstream)
        t.join(15)
        client.close()
        upstream.close()

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)
