"""moto in server mode on loopback, for ACM and Route53."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import requests


@dataclass
class MotoServer:
    server: Any = field(default=None, repr=False)
    endpoint_url: str = ""

    def start(self) -> MotoServer:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def reset(self) -> None:
        requests.post(f"{self.endpoint_url}/moto-api/reset", timeout=5)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
