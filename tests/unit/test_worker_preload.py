"""What a worker builds before it forks its pool processes, so they share it instead of each
building its own on its first certificate (``workers._run_worker_now``).

The public suffix list costs about 26 ms of CPU to parse (a yappi profile of the acme pool found
every prefork child parsing it again, on the clock of its first certificate). Run in a child
process: starting a worker's setup in the test process would leave celery's state behind.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_the_public_suffix_list_is_built_before_the_pool_forks(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import certqueue.csr_fields as csr_fields
        import certqueue.workers as workers

        seen = {}

        def fake_celery(app, argv):  # where celery would fork the pool
            seen["psl"] = csr_fields._psl is not None
            return 0

        workers._celery_exit_code = fake_celery
        workers._exit_after_shutdown = lambda code: None
        assert csr_fields._psl is None
        workers._run_worker_now(
            workers.pool_spec("acme", []), "acme", [], concurrency=1, loglevel=None, hostname=None
        )
        print("psl built before fork:", seen["psl"])

        from certqueue.acme.ratelimit import registered_domain

        class Marked:
            def privatesuffix(self, name):
                return "marked.example"

        csr_fields._psl = Marked()  # the rate limiter reads the same list, not one of its own
        print("shared:", registered_domain("www.example.co.uk") == "marked.example")
        """
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CERTQUEUE_DATABASE__URL": f"sqlite:///{tmp_path / 'c.db'}",
        "CERTQUEUE_BROKER__FILESYSTEM_PATH": str(tmp_path / "broker"),
        "CERTQUEUE_STORAGE__ENCRYPTION_KEY_PATH": str(tmp_path / "master.key"),
        "CERTQUEUE_SETTINGS_DIR": str(tmp_path / "settings"),
    }
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "psl built before fork: True" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "shared: True" in out.stdout, out.stdout
