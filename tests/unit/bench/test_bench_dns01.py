"""DNS-01 case plumbing (bench/dns01.py, devstack/bind.py's zone file) and the storm
profile's per-renewal counts (bench/storm.py): pure parts, no server started."""

from __future__ import annotations

from pathlib import Path

from bench.dns01 import AUTH_ADDRESS, UNSHARE, Authority
from bench.storm import profile_counts
from devstack.bind import BindServer, _zone_file


def test_zone_ns_record_points_at_the_listen_address():
    zone = _zone_file("example.test", "example.test", (), AUTH_ADDRESS)
    assert f"ns IN A {AUTH_ADDRESS}" in zone.splitlines()
    # the names a CA validates HTTP-01 against still resolve to the loopback responder
    assert "* IN A 127.0.0.1" in zone.splitlines()
    assert "ns IN A 127.0.0.1" in _zone_file("example.test", "example.test", ()).splitlines()


def test_nameserver_names_the_address_and_port():
    assert BindServer(address=AUTH_ADDRESS, port=53).nameserver == f"{AUTH_ADDRESS}:53"
    assert BindServer(port=5353).nameserver == "127.0.0.1:5353"


def test_wrap_runs_lego_in_a_mount_namespace_only_when_checked(tmp_path: Path):
    argv = ["/usr/bin/lego", "--dns", "rfc2136", "run"]
    resolv = tmp_path / "resolv.conf"
    wrapped = Authority(BindServer(), resolv).wrap(argv)
    assert wrapped[0] == UNSHARE and "--mount" in wrapped
    assert wrapped[-len(argv) :] == argv and str(resolv) in wrapped
    unchecked = Authority(BindServer(), None, "not root")
    assert unchecked.wrap(argv) == argv and not unchecked.propagation_checked


def test_profile_counts_per_renewal():
    instr = {
        "certqueue.acme.issue_batch": {
            "sql_n": 300,
            "commit_n": 40,
            "http_n": 100,
            "task_n": 5,
            "sql_s": 1.5,
        },
        "-": {"sql_n": 100, "http_n": 20},
    }
    out = profile_counts(instr, 50)
    assert out["sql_statements_per_renewal"] == 8.0
    assert out["http_requests_per_renewal"] == 2.4
    assert out["commits_per_renewal"] == 0.8
    assert out["sql_s_per_renewal"] == 0.03
    assert out["per_task_per_renewal"]["certqueue.acme.issue_batch"]["task_n"] == 0.1
    assert out["totals"]["sql_n"] == 400
    assert profile_counts(instr, 0)["sql_statements_per_renewal"] is None
