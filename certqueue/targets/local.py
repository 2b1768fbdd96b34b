"""The ``local`` target: PEM files in a directory a web server points at once.

Owns ``<path>/<certificate_id>/`` and nothing else: ``cert.pem`` (leaf), ``chain.pem``,
``fullchain.pem``, ``privkey.pem``. Each file is written to a temporary file in the same directory,
fsynced and renamed over the old one, so a reader sees the old file or the new one, never half of
one. The key's temporary file is created 0600 (``mkstemp``), so the key is never readable by others,
not even for a moment. The reload command (no shell, bounded by a timeout) runs after all four files
are in place and only when something changed; if it fails, a ``.reload-pending`` marker makes the
next deploy run it again even though the files are already current.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from certqueue import plugins
from certqueue.errors import ConfigError
from certqueue.plugins import Setting
from certqueue.targets._shared import check_bundle, error, non_negative, read_settings
from certqueue.targets.base import Bundle, Target, leaf_fingerprint

NAME = "local"
CERT, CHAIN, FULLCHAIN, KEY = "cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"
RELOAD_PENDING = ".reload-pending"
PUBLIC_MODE = 0o644

SETTINGS: plugins.Table = (
    Setting(
        "path",
        (str, os.PathLike),
        "absolute directory; each certificate gets <path>/<certificate_id>/",
        required=True,
    ),
    Setting(
        "reload_command",
        (str, list, tuple),
        "argv (or a string split like a shell would, never run by one) run after a change",
    ),
    Setting("reload_timeout", (int, float), "seconds the reload command may take", default=30.0),
    Setting("file_mode", (int, str), "mode of privkey.pem (octal, no access for others)", default=0o600),
    Setting("owner", (str, int), "user owning the files"),
    Setting("group", (str, int), "group owning the files"),
)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class LocalFilesTarget(Target):
    name = NAME
    settings = SETTINGS

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        s = read_settings(NAME, config, SETTINGS)
        non_negative(NAME, s, "reload_timeout")
        self.root = Path(s["path"])
        if not self.root.is_absolute():
            raise ConfigError(f"target {NAME}: 'path' must be absolute", source=f"target {NAME}", key="path")
        self.reload_command = _command(s["reload_command"])
        self.reload_timeout = float(s["reload_timeout"])
        self.key_mode = _mode(s["file_mode"])
        self.uid = _uid(s["owner"])
        self.gid = _gid(s["group"])

    # -- interface -------------------------------------------------------------------------------

    def deploy(self, bundle: Bundle, previous_ref: str | None) -> str:
        check_bundle(NAME, bundle)
        directory = self._directory(bundle.certificate_id)
        files = {
            CERT: (bundle.cert_pem, PUBLIC_MODE),
            CHAIN: (bundle.chain_pem, PUBLIC_MODE),
            FULLCHAIN: (bundle.fullchain_pem, PUBLIC_MODE),
            KEY: (bundle.key_pem, self.key_mode),
        }
        try:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            changed = False
            # the key first: a server that reloads on its own sees a new key only with its certificate
            # a moment later, never a new certificate paired with an old key for longer than that
            for filename in (KEY, CHAIN, FULLCHAIN, CERT):
                content, mode = files[filename]
                changed |= self._write(directory / filename, content.encode(), mode)
            _fsync_dir(directory)
        except OSError as exc:
            raise error(
                NAME,
                "io",
                f"certificate {bundle.certificate_id}: cannot write {directory}: "
                f"{exc.strerror or type(exc).__name__}",
                retryable=not isinstance(exc, PermissionError),
            ) from exc
        pending = directory / RELOAD_PENDING
        if self.reload_command and (changed or pending.exists()):
            pending.touch(mode=0o600)
            self._reload(bundle.certificate_id)
            pending.unlink(missing_ok=True)
        return str(directory)

    def fingerprint(self, ref: str) -> str | None:
        path = self._owned(ref) / CERT
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise error(
                NAME, "io", f"cannot read {path}: {exc.strerror or type(exc).__name__}", retryable=True
            ) from exc
        try:
            return leaf_fingerprint(data)
        except ValueError:
            return None  # not a certificate: nothing we deployed is live there

    def remove(self, ref: str) -> None:
        directory = self._owned(ref)
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise error(
                NAME, "io", f"cannot remove {directory}: {exc.strerror or type(exc).__name__}", retryable=True
            ) from exc

    def hook_environment(self, ref: str) -> dict[str, str]:
        """The four files' paths, and the directory as certbot's ``RENEWED_LINEAGE`` (it holds the
        files under certbot's own names, so a certbot deploy hook finds them)."""
        directory = self._owned(ref)
        return {
            "CERTQUEUE_CERT_PATH": str(directory / CERT),
            "CERTQUEUE_CHAIN_PATH": str(directory / CHAIN),
            "CERTQUEUE_FULLCHAIN_PATH": str(directory / FULLCHAIN),
            "CERTQUEUE_KEY_PATH": str(directory / KEY),
            "RENEWED_LINEAGE": str(directory),
        }

    # -- files -----------------------------------------------------------------------------------

    def _directory(self, certificate_id: str) -> Path:
        if not _SAFE_ID.match(certificate_id):
            raise error(
                NAME,
                "invalid",
                f"certificate id {certificate_id!r} is not a safe directory name",
                retryable=False,
            )
        return self.root / certificate_id

    def _owned(self, ref: str) -> Path:
        """The directory ``ref`` names, refused unless it is one of ours (never rmtree elsewhere)."""
        directory = Path(ref)
        if directory.parent != self.root or not _SAFE_ID.match(directory.name):
            raise error(
                NAME, "invalid", f"{ref!r} is not a certificate directory under {self.root}", retryable=False
            )
        return directory

    def _write(self, path: Path, content: bytes, mode: int) -> bool:
        """Atomically replace ``path`` with ``content``; False when it already held exactly that."""
        try:
            st = path.stat()
            if st.st_mode & 0o7777 == mode and path.read_bytes() == content and self._owner_ok(st):
                return False
        except FileNotFoundError:
            pass
        # mkstemp creates the file 0600: the key is never readable by others, not even briefly
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                if self.uid is not None or self.gid is not None:
                    os.fchown(
                        fh.fileno(),
                        -1 if self.uid is None else self.uid,
                        -1 if self.gid is None else self.gid,
                    )
                os.fchmod(fh.fileno(), mode)
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return True

    def _owner_ok(self, st: os.stat_result) -> bool:
        return (self.uid is None or st.st_uid == self.uid) and (self.gid is None or st.st_gid == self.gid)

    def _reload(self, certificate_id: str) -> None:
        assert self.reload_command is not None
        program = self.reload_command[0]
        try:
            subprocess.run(
                self.reload_command,
                check=True,
                timeout=self.reload_timeout,
                shell=False,
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise error(
                NAME,
                "reload_failed",
                f"certificate {certificate_id}: reload command {program!r} "
                f"did not finish within {self.reload_timeout:g}s",
                retryable=True,
            ) from exc
        except subprocess.CalledProcessError as exc:
            raise error(
                NAME,
                "reload_failed",
                f"certificate {certificate_id}: reload command {program!r} "
                f"exited with status {exc.returncode}",
                retryable=True,
            ) from exc
        except OSError as exc:
            raise error(
                NAME,
                "reload_failed",
                f"certificate {certificate_id}: cannot run reload command "
                f"{program!r}: {exc.strerror or type(exc).__name__}",
                retryable=False,
            ) from exc


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _command(value: str | list[Any] | tuple[Any, ...] | None) -> list[str] | None:
    if value is None:
        return None
    argv = shlex.split(value) if isinstance(value, str) else [str(a) for a in value]
    if not argv:
        raise ConfigError(
            f"target {NAME}: 'reload_command' is empty", source=f"target {NAME}", key="reload_command"
        )
    return argv


def _mode(value: int | str) -> int:
    try:
        mode = int(value, 8) if isinstance(value, str) else value
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o007:
        raise ConfigError(
            f"target {NAME}: 'file_mode' must be an octal mode with no access for others "
            f"(e.g. 0o600 or '0640'), not {value!r}",
            source=f"target {NAME}",
            key="file_mode",
        )
    return mode


def _uid(owner: str | int | None) -> int | None:
    if owner is None or isinstance(owner, int):
        return owner
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ConfigError(
            f"target {NAME}: unknown user {owner!r}", source=f"target {NAME}", key="owner"
        ) from None


def _gid(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"target {NAME}: unknown group {group!r}", source=f"target {NAME}", key="group"
        ) from None
