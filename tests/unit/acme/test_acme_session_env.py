"""The ACME client's HTTP session reads the proxy and CA-bundle environment once per host
(``certqueue.acme.client._EnvReadOnceSession``), and honours it as requests does.

requests scans ``os.environ`` twice on every request to find proxies: 0.077 ms of CPU per request
with 35 variables, timed on its own (a yappi profile had overcharged it at 2 ms). The environment
of a running process does not change, so the answer is kept per host.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests.utils

from certqueue.acme.client import _EnvReadOnceSession, _Network


def _merge(session: requests.Session, url: str, verify: Any = True) -> dict[str, Any]:
    return session.merge_environment_settings(url, {}, None, verify, None)


def test_proxies_from_the_environment_are_used_and_no_proxy_is_honoured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "ca.local")
    s = _EnvReadOnceSession()
    assert _merge(s, "https://acme.example.org/directory")["proxies"]["https"] == "http://proxy.internal:3128"
    assert "https" not in _merge(s, "https://ca.local:14000/dir")["proxies"]
    # what plain requests decides, for the same environment
    plain = requests.Session()
    for url in ("https://acme.example.org/directory", "https://ca.local:14000/dir"):
        assert _merge(s, url)["proxies"] == _merge(plain, url)["proxies"]


def test_the_environment_is_read_once_per_host(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = requests.utils.get_environ_proxies

    def counting(url: str, no_proxy: Any = None) -> dict[str, str]:
        calls.append(url)
        return real(url, no_proxy=no_proxy)

    monkeypatch.setattr(requests.utils, "get_environ_proxies", counting)
    s = _EnvReadOnceSession()
    for i in range(5):
        _merge(s, f"https://acme.example.org/acme/order/{i}")
    _merge(s, "https://other.example.org/x")
    assert [u.split("/")[2] for u in calls] == ["acme.example.org", "other.example.org"]


def test_a_ca_bundle_from_the_environment_applies_only_without_an_explicit_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/env-bundle.pem")
    s = _EnvReadOnceSession()
    assert _merge(s, "https://acme.example.org/", verify=True)["verify"] == "/etc/ssl/env-bundle.pem"
    assert _merge(s, "https://acme.example.org/", verify="/mine.pem")["verify"] == "/mine.pem"
    assert _merge(s, "https://acme.example.org/", verify=False)["verify"] is False


def test_the_client_network_uses_it_with_acme_s_adapter() -> None:
    net = _Network(user_agent="test")
    assert isinstance(net.session, _EnvReadOnceSession)
    # the adapter acme mounted (its retries) is the one requests go through
    assert net.session.get_adapter("https://acme.example.org/") is net.session.adapters["https://"]
    assert type(net.session.adapters["https://"]).__name__ == "HTTPAdapter"


def test_no_http_credential_is_sent_and_netrc_is_not_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """ACME requests are signed (JWS): a ``~/.netrc`` entry for the CA's host is neither looked up
    on each request nor sent, where plain requests would send it as Basic auth."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen: list[str | None] = []

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    srv = HTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/acme/order/1"
        lookups: list[object] = []
        real = requests.sessions.get_netrc_auth

        def counting(*args: Any, **kwargs: Any) -> Any:
            lookups.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(requests.sessions, "get_netrc_auth", counting)
        with requests.Session() as plain:
            plain.get(url, timeout=10)
        assert seen[-1] is not None and seen[-1].startswith("Basic ") and len(lookups) == 1
        s = _EnvReadOnceSession()
        for _ in range(3):
            assert s.get(url, timeout=10).status_code == 204
        assert seen[1:] == [None, None, None]
        assert len(lookups) == 1  # only plain requests' own lookup
    finally:
        srv.shutdown()
        srv.server_close()
