"""A throwaway BIND9 primary for DNS-01 over RFC 2136, on loopback.

Owns one ``named`` process and its work folder: the configuration, the zone files, the journal and
the TSIG key. ``named`` runs in the foreground (``-g``) as ``nobody`` when we are root, listens on
``address`` (127.0.0.1) at ``port`` (a free high port unless one is given; a port below 1024, e.g. 53,
is bound with the ``net_bind_service`` capability only), TCP and UDP, answers only for its own zones
(``recursion no``) and has no control channel. The zone's ``ns`` A record is ``address``, so a client
that asks the zone's nameserver on port 53 (lego's propagation check) finds this server when it
listens on port 53 of a loopback address of its own. Each zone accepts signed dynamic updates of TXT
records only (``update-policy { grant <key> zonesub TXT; }``).

The primary zone (``example.test`` by default) also has an apex A and a wildcard A, both 127.0.0.1,
and an ``ns`` A at ``address``, so a CA resolving through this server (Pebble's ``-dnsserver``) can
validate HTTP-01 for any name in it against a loopback responder. Secondary zones (``validation.test``
by default) are for CNAME-delegated validation tests.

Not used by a production deployment.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from devstack.ports import free_tcp_udp_port

NAMED = "/usr/sbin/named"
TSIG_KEYGEN = "/usr/sbin/tsig-keygen"
CHECKCONF = "/usr/bin/named-checkconf"
CHECKZONE = "/usr/bin/named-checkzone"

_SECRET_RE = re.compile(r'secret\s+"([A-Za-z0-9+/=]+)"')


class BindError(RuntimeError):
    """named could not be configured or started; carries the tail of its log (never the key)."""


def _zone_file(zone: str, primary: str, extra: Sequence[str], ns_address: str = "127.0.0.1") -> str:
    ns = f"ns.{primary}."
    lines = [
        "$TTL 60",
        f"@ IN SOA {ns} hostmaster.{zone}. 1 3600 600 86400 1",
        f"@ IN NS {ns}",
    ]
    if zone == primary:
        lines += [
            "@ IN A 127.0.0.1",
            f"ns IN A {ns_address}",
            "* IN A 127.0.0.1",
        ]
    lines += list(extra)
    return "\n".join(lines) + "\n"


@dataclass
class BindServer:
    """``BindServer().start()`` ... ``stop()``; or use it as a context manager.

    ``records`` maps a zone to extra zone-file lines (relative or absolute owner names), e.g.
    ``{"example.test": ["_acme-challenge.alias CNAME _acme-challenge.alias.validation.test."]}``.
    """

    zone: str = "example.test"
    extra_zones: tuple[str, ...] = ("validation.test",)
    records: Mapping[str, Sequence[str]] = field(default_factory=dict)
    key_name: str = "certqueue-dns01"
    algorithm: str = "hmac-sha256"
    start_timeout: float = 15.0
    port: int = 0
    address: str = "127.0.0.1"
    workdir: Path | None = None
    secret: str = field(default="", repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # -- public surface ----------------------------------------------------------------------

    @property
    def zones(self) -> tuple[str, ...]:
        return (self.zone, *self.extra_zones)

    @property
    def nameserver(self) -> str:
        """``"ADDRESS:PORT"``, the form the rfc2136 provider and the resolver settings take."""
        return f"{self.address}:{self.port}"

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """Settings for ``certqueue.dns.rfc2136.RFC2136Provider`` against this server."""
        cfg: dict[str, Any] = {
            "nameserver": self.nameserver,
            "tsig_key_name": self.key_name,
            "tsig_secret": self.secret,
            "tsig_algorithm": self.algorithm,
            "ttl": 60,
        }
        cfg.update(overrides)
        return cfg

    def start(self) -> BindServer:
        if self.process is not None:
            return self
        for tool in (NAMED, TSIG_KEYGEN, CHECKCONF, CHECKZONE):
            if not os.access(tool, os.X_OK):
                raise BindError(f"{tool} not found: install bind9 and bind9-utils")
        # Not under pytest's tmp_path: that is 0700 root, which ``nobody`` cannot traverse.
        self.workdir = Path(tempfile.mkdtemp(prefix="certqueue-bind-"))
        try:
            self.secret = self._make_key()
            if not self.port:
                self.port = free_tcp_udp_port()
            self._write_config()
            self._check()
            self._chown()
            self._spawn()
            self._wait_ready()
        except BaseException:
            self.stop()  # kills named if it started and removes the work folder
            raise
        return self

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def log_tail(self, lines: int = 30) -> str:
        if self.workdir is None:
            return ""
        try:
            text = (self.workdir / "named.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> BindServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _make_key(self) -> str:
        out = subprocess.run(
            [TSIG_KEYGEN, "-a", self.algorithm, self.key_name],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        m = _SECRET_RE.search(out)
        if m is None:
            raise BindError("could not parse tsig-keygen output")
        return m.group(1)

    def _write_config(self) -> None:
        assert self.workdir is not None
        wd = self.workdir
        zone_stanzas = []
        for zone in self.zones:
            (wd / f"{zone}.zone").write_text(
                _zone_file(zone, self.zone, self.records.get(zone, ()), self.address)
            )
            zone_stanzas.append(
                f'zone "{zone}" {{\n  type primary;\n  file "{wd}/{zone}.zone";\n'
                f'  update-policy {{ grant "{self.key_name}" zonesub TXT; }};\n}};\n'
            )
        conf = (
            f'key "{self.key_name}" {{\n  algorithm {self.algorithm};\n  secret "{self.secret}";\n}};\n'
            "controls { };\n"
            "options {\n"
            f'  directory "{wd}";\n'
            f'  pid-file "{wd}/named.pid";\n'
            f'  session-keyfile "{wd}/session.key";\n'
            f'  managed-keys-directory "{wd}";\n'
            f"  listen-on port {self.port} {{ {self.address}; }};\n"
            "  listen-on-v6 { none; };\n"
            "  recursion no;\n"
            "  dnssec-validation no;\n"
            "  notify no;\n"
            "  allow-transfer { none; };\n"
            "};\n" + "".join(zone_stanzas)
        )
        conf_path = wd / "named.conf"
        conf_path.write_text(conf)
        conf_path.chmod(0o600)  # holds the TSIG secret

    def _check(self) -> None:
        assert self.workdir is not None
        res = subprocess.run(
            [CHECKCONF, str(self.workdir / "named.conf")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if res.returncode != 0:
            raise BindError(f"named-checkconf failed: {res.stdout[-500:]}{res.stderr[-500:]}")
        for zone in self.zones:
            res = subprocess.run(
                [CHECKZONE, "-q", zone, str(self.workdir / f"{zone}.zone")],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if res.returncode != 0:
                raise BindError(f"named-checkzone {zone} failed: {res.stdout[-500:]}{res.stderr[-500:]}")

    def _run_as_nobody(self) -> bool:
        return os.geteuid() == 0

    def _chown(self) -> None:
        if not self._run_as_nobody():
            return
        assert self.workdir is not None
        pw = pwd.getpwnam("nobody")
        for p in (self.workdir, *self.workdir.iterdir()):
            os.chown(p, pw.pw_uid, pw.pw_gid)

    def _spawn(self) -> None:
        assert self.workdir is not None
        cmd = [NAMED, "-g", "-4", "-c", str(self.workdir / "named.conf")]
        if self._run_as_nobody():
            caps = []
            if self.port < 1024:  # e.g. 53, for a client that asks the zone's NS on the DNS port
                caps = ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]
            cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *caps, *cmd]
        log = (self.workdir / "named.log").open("wb")
        try:
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        finally:
            log.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        query = dns.message.make_query(self.zone, dns.rdatatype.SOA)
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BindError(f"named exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                resp = dns.query.udp(query, self.address, port=self.port, timeout=0.3)
                if resp.rcode() == dns.rcode.NOERROR and resp.answer:
                    return
            if time.monotonic() > deadline:
                raise BindError(
                    f"named did not answer SOA {self.zone} within {self.start_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
