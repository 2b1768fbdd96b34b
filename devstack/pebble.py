"""Pebble (a test ACME CA) and pebble-challtestsrv (its mock DNS) on loopback.

Owns the processes it starts, their temporary folders and nothing else. Both are the Debian
package's binaries (``/usr/bin/pebble``, ``/usr/bin/pebble-challtestsrv``, version 2.4.0); the facts
this module relies on are in ``TEST-SERVERS.md``:

* the package ships no certificate for Pebble's HTTPS listener: one is made per run with
  :func:`devstack.tls.make_server_tls`, and :attr:`PebbleServer.ca_bundle` is the file a
  client must trust;
* ``PEBBLE_VA_NOSLEEP=1`` and ``PEBBLE_AUTHZREUSE=0`` by default, for fast and deterministic runs;
  callers may override any variable (``PEBBLE_WFE_NONCEREJECT`` for fault injection);
* Pebble keeps no state and makes new roots at every start; its management interface (HTTPS, same
  certificate) serves the roots, the intermediates and the revocation status of a serial.

Typical use, with HTTP-01 answered by the caller on ``http_port``::

    with ChallTestSrv() as dns, PebbleServer(http_port=5002, dns_server=dns.dns_address) as ca:
        client = AcmeClient(ca.directory_url, key, None, verify=str(ca.ca_bundle))
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from devstack.ports import free_port, free_tcp_udp_port, wait_tcp
from devstack.tls import make_server_tls

PEBBLE_BIN = "/usr/bin/pebble"
CHALLTESTSRV_BIN = "/usr/bin/pebble-challtestsrv"

#: environment Pebble gets unless the caller overrides a key
DEFAULT_PEBBLE_ENV: dict[str, str] = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0"}

_HTTP_TIMEOUT = 5.0


def _stop_group(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """Terminate the process group led by ``proc`` (started with ``start_new_session``)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class ChallTestSrv:
    """pebble-challtestsrv as a mock DNS server that answers every A query with 127.0.0.1.

    Its HTTP-01, HTTPS, TLS-ALPN-01 and DoH responders are switched off: HTTP-01 is answered by the
    caller on Pebble's ``httpPort``. AAAA answers are disabled (``-defaultIPv6 ""``) or Pebble would
    validate against ``[::1]``. TXT records for DNS-01 can be set through the management interface.
    """

    dns_port: int = 0
    management_port: int = 0
    startup_timeout: float = 15.0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    workdir: Path | None = field(default=None, repr=False)

    @property
    def dns_address(self) -> str:
        """``127.0.0.1:PORT``, the value for Pebble's ``-dnsserver``."""
        return f"127.0.0.1:{self.dns_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def start(self) -> ChallTestSrv:
        self.dns_port = self.dns_port or free_tcp_udp_port()
        self.management_port = self.management_port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="certqueue-challtestsrv-"))
        argv = [
            CHALLTESTSRV_BIN,
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            self.dns_address,
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            f"127.0.0.1:{self.management_port}",
        ]
        with open(self.workdir / "challtestsrv.log", "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            wait_tcp("127.0.0.1", self.management_port, timeout=self.startup_timeout)
            wait_tcp("127.0.0.1", self.dns_port, timeout=self.startup_timeout)
        except TimeoutError as exc:
            tail = _log_tail(self.workdir / "challtestsrv.log")
            self.stop()
            raise RuntimeError(f"pebble-challtestsrv did not start:\n{tail}") from exc
        return self

    def _post(self, path: str, body: dict[str, Any]) -> None:
        resp = requests.post(f"{self.management_url}{path}", json=body, timeout=_HTTP_TIMEOUT)
        resp.raise_for_status()

    def set_txt(self, fqdn: str, value: str) -> None:
        """Publish a TXT record (replaces any value at ``fqdn``); ``fqdn`` may omit the final dot."""
        self._post("/set-txt", {"host": fqdn.rstrip(".") + ".", "value": value})

    def clear_txt(self, fqdn: str) -> None:
        self._post("/clear-txt", {"host": fqdn.rstrip(".") + "."})

    def stop(self) -> None:
        _stop_group(self.proc)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> ChallTestSrv:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class PebbleServer:
    """One Pebble process with its own config, TLS certificate and ports, all on 127.0.0.1.

    ``http_port`` is where Pebble sends HTTP-01 validation requests (the caller's responder listens
    there); ``dns_server`` (``host:port``) makes Pebble resolve names through it. ``env`` overrides
    :data:`DEFAULT_PEBBLE_ENV`. ``eab_keys`` (kid -> base64url HMAC key) makes external account
    binding required.
    """

    http_port: int = 5002
    tls_port: int = 0
    dns_server: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    eab_keys: dict[str, str] | None = None
    startup_timeout: float = 20.0
    listen_port: int = 0
    management_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    workdir: Path | None = field(default=None, repr=False)
    ca_bundle: Path | None = None

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.listen_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None, "Pebble is not running"
        return self.workdir / "pebble.log"

    def log_text(self) -> str:
        """Pebble's combined stdout and stderr so far (for test diagnostics)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _write_config(self, workdir: Path) -> Path:
        tls = make_server_tls(workdir / "tls", label="certqueue pebble")
        self.ca_bundle = tls.ca_cert
        conf: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.listen_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(tls.cert),
            "privateKey": str(tls.key),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(self.eab_keys),
        }
        if self.eab_keys:
            conf["externalAccountMACKeys"] = dict(self.eab_keys)
        path = workdir / "pebble-config.json"
        path.write_text(json.dumps({"pebble": conf}, indent=2))
        path.chmod(0o600)
        return path

    def start(self) -> PebbleServer:
        self.listen_port = self.listen_port or free_port()
        self.management_port = self.management_port or free_port()
        self.tls_port = self.tls_port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="certqueue-pebble-"))
        config = self._write_config(self.workdir)
        argv = [PEBBLE_BIN, "-config", str(config)]
        if self.dns_server:
            argv += ["-dnsserver", self.dns_server]
        env = {**os.environ, **DEFAULT_PEBBLE_ENV, **self.env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"pebble exited with {self.proc.returncode}:\n{_log_tail(self.log_path)}")
            try:
                resp = requests.get(self.directory_url, verify=str(self.ca_bundle), timeout=1.0)
                if resp.ok and "newOrder" in resp.json():
                    return
            except (requests.RequestException, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(
            f"pebble directory not answering after {self.startup_timeout}s ({last!r}):\n"
            f"{_log_tail(self.log_path)}"
        )

    def _management_get(self, path: str) -> requests.Response:
        resp = requests.get(f"{self.management_url}{path}", verify=str(self.ca_bundle), timeout=_HTTP_TIMEOUT)
        resp.raise_for_status()
        return resp

    def roots_pem(self, index: int = 0) -> str:
        """The root certificate Pebble issues under (new at every start)."""
        return self._management_get(f"/roots/{index}").text

    def intermediates_pem(self, index: int = 0) -> str:
        return self._management_get(f"/intermediates/{index}").text

    def cert_status(self, serial_hex: str) -> dict[str, Any]:
        """Pebble's view of a certificate: ``Status`` ("Valid"/"Revoked"), ``Reason``, ``RevokedAt``...

        ``serial_hex`` is the serial in hexadecimal, as Pebble formats it (lowercase, no leading zeros
        beyond Go's ``%x``); use ``format(cert.serial_number, "x")``.
        """
        data: dict[str, Any] = self._management_get(f"/cert-status-by-serial/{serial_hex}").json()
        return data

    def stop(self) -> None:
        _stop_group(self.proc)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> PebbleServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
