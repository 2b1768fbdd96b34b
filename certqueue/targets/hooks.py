"""Deploy hooks: a command run on the node that deployed, after a successful deployment to a target
(certbot's ``--deploy-hook``). Owns no state: the hook runs inside the deploy that succeeded, so a
failed hook fails that deploy and the next attempt deploys (a no-op for files already current) and
runs the hook again.

Settings, on any region entry (``multi_region.regions[]``), whatever its target::

    deploy_hook: ["/usr/local/bin/reload-haproxy", "--graceful"]   # argv, run without a shell
    deploy_hook_shell: "systemctl reload nginx && logger renewed"  # or: a shell string, explicitly
    deploy_hook_timeout: 30                                         # seconds (default 30, at most 300)

The hook runs with a small environment built here, never the worker's own (which may hold
credentials): ``PATH``, ``HOME``, ``LANG``, ``LC_ALL``, ``TZ`` from the worker, and the variables of
``environment`` below. No private key and no secret is in it (the key's *path* is, for a files
target); its output is logged, bounded and with anything PEM-shaped removed. A non-zero exit or a
timeout is a retryable failure of that target (reason ``<target>:deploy_hook_exit_<code>``,
``<target>:deploy_hook_signal_<n>``, ``<target>:deploy_hook_timeout``); a hook that cannot be
started (no such file, not executable) is permanent (``<target>:deploy_hook_not_run``): a wrong
path does not fix itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from certqueue import plugins
from certqueue.errors import ConfigError, TargetError
from certqueue.logsafe import safe_detail
from certqueue.plugins import Setting

log = logging.getLogger("certqueue.targets.hooks")

SETTINGS: plugins.Table = (
    Setting("deploy_hook", (list, tuple), "argv run after each successful deploy (no shell)"),
    Setting("deploy_hook_shell", (str,), "a command line run by /bin/sh -c instead (explicitly)"),
    Setting("deploy_hook_timeout", (int, float), "seconds the hook may take (at most 300)", default=30.0),
)
HOOK_KEYS = frozenset(s.key for s in SETTINGS)
MAX_TIMEOUT = 300.0
#: how much of the hook's output goes into the log
OUTPUT_LIMIT = 2000
#: variables passed on from the worker's environment (nothing else of it is)
PASSED_ON = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class DeployHook:
    """A hook as configured: ``argv`` is run directly, or ``argv[0]`` by ``/bin/sh -c`` when ``via_shell``."""

    argv: tuple[str, ...]
    via_shell: bool = False
    timeout: float = 30.0

    @property
    def program(self) -> str:
        return "/bin/sh -c" if self.via_shell else self.argv[0]

    @classmethod
    def from_settings(cls, target: str, config: Mapping[str, Any]) -> DeployHook | None:
        """The hook a region entry configures, or None. Both spellings at once, an empty or
        non-string argv, a plain string for ``deploy_hook`` (it would be split or run by a shell
        by surprise) and a timeout out of range are ConfigErrors."""
        where = f"target {target}"
        given = {k: v for k, v in config.items() if k in HOOK_KEYS}
        if isinstance(given.get("deploy_hook"), str):
            raise ConfigError(
                f'{where}: \'deploy_hook\' is an argv list (e.g. ["/usr/bin/reload", "--x"]); '
                "for a shell command line use 'deploy_hook_shell'",
                source=where,
                key="deploy_hook",
            )
        s = plugins.read_settings("target", target, given, SETTINGS)
        timeout = float(s["deploy_hook_timeout"])
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ConfigError(
                f"{where}: 'deploy_hook_timeout' must be more than 0 and at most {MAX_TIMEOUT:g}",
                source=where,
                key="deploy_hook_timeout",
            )
        argv, line = s["deploy_hook"], s["deploy_hook_shell"]
        if argv is not None and line is not None:
            raise ConfigError(
                f"{where}: 'deploy_hook' and 'deploy_hook_shell' exclude each other",
                source=where,
                key="deploy_hook",
            )
        if line is not None:
            if not line.strip():
                raise ConfigError(
                    f"{where}: 'deploy_hook_shell' is empty", source=where, key="deploy_hook_shell"
                )
            return cls((line,), via_shell=True, timeout=timeout)
        if argv is None:
            if given.get("deploy_hook_timeout") is not None:
                raise ConfigError(
                    f"{where}: 'deploy_hook_timeout' without a hook", source=where, key="deploy_hook"
                )
            return None
        if not argv or not all(isinstance(a, str) and a for a in argv):
            raise ConfigError(
                f"{where}: 'deploy_hook' must be a non-empty list of non-empty strings",
                source=where,
                key="deploy_hook",
            )
        return cls(tuple(argv), timeout=timeout)


def environment(
    *,
    certificate_id: str,
    names: tuple[str, ...],
    cert_pem: str,
    target: str,
    region: str,
    ref: str,
    files: Mapping[str, str] | None = None,
    parent: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What the hook sees. ``files`` (a files target's ``hook_environment``) adds the ``*_PATH``
    variables and certbot's ``RENEWED_LINEAGE``; ``RENEWED_DOMAINS`` is always there, so a
    certbot hook works unchanged. Nothing secret goes in: the key is passed by path only."""
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    parent = os.environ if parent is None else parent
    env = {k: parent[k] for k in PASSED_ON if parent.get(k)}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.update(
        CERTQUEUE_CERTIFICATE_ID=certificate_id,
        CERTQUEUE_NAMES=" ".join(names),
        CERTQUEUE_PRIMARY_NAME=names[0] if names else "",
        CERTQUEUE_REGION=region,
        CERTQUEUE_TARGET=target,
        CERTQUEUE_TARGET_REF=ref,
        CERTQUEUE_SERIAL=format(leaf.serial_number, "x"),
        CERTQUEUE_NOT_AFTER=leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        RENEWED_DOMAINS=" ".join(names),
    )
    env.update(files or {})
    return env


def _excerpt(output: bytes | str | None) -> str:

    text = output.decode(errors="replace") if isinstance(output, bytes) else (output or "")
    return safe_detail(text, OUTPUT_LIMIT)


def run(hook: DeployHook, target: str, certificate_id: str, env: Mapping[str, str]) -> None:
    """Run the hook once; TargetError when it fails (see the module docstring for the reasons).

    The hook gets a process group of its own, so a timeout kills what it started too (a shell's
    children would otherwise keep running, and keep its output pipe open)."""
    argv = ["/bin/sh", "-c", hook.argv[0]] if hook.via_shell else list(hook.argv)
    where = f"certificate {certificate_id}: deploy hook {hook.program!r}"
    try:
        proc = subprocess.Popen(
            argv,
            shell=False,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise TargetError(
            target,
            f"{where} cannot be run: {exc.strerror or type(exc).__name__}",
            reason=f"{target}:deploy_hook_not_run",
        ) from exc
    try:
        out, _ = proc.communicate(timeout=hook.timeout)
    except subprocess.TimeoutExpired as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        log.warning("%s: killed after %gs; output: %s", where, hook.timeout, _excerpt(out))
        raise TargetError(
            target,
            f"{where} did not finish within {hook.timeout:g}s",
            retryable=True,
            reason=f"{target}:deploy_hook_timeout",
        ) from exc
    output = _excerpt(out)
    if proc.returncode != 0:
        how = (
            f"was killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited with status {proc.returncode}"
        )
        kind = f"signal_{-proc.returncode}" if proc.returncode < 0 else f"exit_{proc.returncode}"
        log.warning("%s %s; output: %s", where, how, output)
        raise TargetError(target, f"{where} {how}", retryable=True, reason=f"{target}:deploy_hook_{kind}")
    log.info("%s succeeded; output: %s", where, output or "(none)")
