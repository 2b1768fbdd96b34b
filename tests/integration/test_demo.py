"""`make demo`'s program runs end to end (Pebble, BIND9 when present, the embedded default)."""

import pytest

from certqueue.demo import run_demo

pytestmark = pytest.mark.integration


def test_demo_issues_renews_revokes_and_deploys(tmp_path, capsys):
    assert run_demo(workdir=tmp_path / "demo") == 0
    deployed = tmp_path / "demo" / "deployed"
    dirs = [d for d in deployed.iterdir() if d.is_dir()]
    assert len(dirs) >= 2
    for d in dirs:
        assert (d / "privkey.pem").stat().st_mode & 0o077 == 0
        assert (d / "fullchain.pem").read_text().count("BEGIN CERTIFICATE") >= 2
    out = capsys.readouterr().out
    assert "REVOKED" in out and "ACTIVE" in out
    assert "PRIVATE KEY" not in out
