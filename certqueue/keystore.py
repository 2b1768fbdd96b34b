"""Encryption at rest of private keys and ACME account keys (AES-256-GCM under a master keyring).

Owns the key file and the ciphertext blob format; the database only stores the blobs.

Blob (bytes, stored as-is in a binary column)::

    0x01 | len(kid) (1 byte) | kid (ASCII) | nonce (12 random bytes) | ciphertext + 16-byte GCM tag

The GCM associated data is ``header || aad`` where ``header`` is everything before the nonce and
``aad`` names the row the blob belongs to (``b"issuances:42:key"``): a blob copied to another row,
or with its kid rewritten, does not decrypt. A fresh random 96-bit nonce per blob is safe up to
2**32 encryptions under one key, far above what a certificate fleet writes before rotating.

Key file, two forms (both must be mode 0600 or stricter; anything readable or writable by group or
others is refused):

* raw: exactly 32 bytes, nothing else (``head -c 32 /dev/urandom``). One key; its kid is derived
  from a hash of the key (``r`` + 10 hex digits) so it is stable across restarts.
* keyring: UTF-8 text whose first line is ``certqueue-keyring 1``; blank lines and ``#`` comments
  are ignored; then one line per key and one ``active`` line::

      certqueue-keyring 1
      key k3f9c01d2a7 raw <base64 of 32 bytes>
      key k81be4470c3 pbkdf2-sha256 600000 <base64 salt> <base64 passphrase>
      active k81be4470c3

  ``pbkdf2-sha256`` keys are derived from the passphrase with PBKDF2-HMAC-SHA256, the stored 16-byte
  salt and iteration count (600,000 by default, the OWASP 2023 figure). The passphrase form is for
  secret stores and operators that handle text, not bytes; it keeps the passphrase in the file, so
  the file is exactly as secret as a raw key.

Rotation has two phases (``certqueue.keyrotation``). ``certqueue keys rotate``: ``rotate_key_file``
adds a new active key and keeps the old ones (a raw file becomes a keyring holding the old key under
its derived kid), then every row is re-encrypted with ``reencrypt`` in committed batches.
``certqueue keys retire``, later and separately: ``retire_keys`` drops the old keys, but only once no
row and no live process (``process_heartbeats``) still uses one. A crash between any two steps leaves
every row readable, because the keyring still holds every key a row can be under. Run one rotation
at a time: the file is replaced atomically, but two concurrent rotations could each drop the other's
new key.

Running processes see a new key file without a restart: ``current(path)`` (what
``certqueue.certificates.keystore`` returns) compares the file's identity (device, inode, size,
mtime) on every call, one ``stat``, and loads it again when it changed. A file that fails to load
keeps the keyring in force (logged): a half-edited file must not stop a fleet.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from certqueue.errors import KeyStoreError

BLOB_VERSION: Final = 1
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
SALT_BYTES: Final = 16
PBKDF2_ITERATIONS: Final = 600_000
MIN_PBKDF2_ITERATIONS: Final = 100_000
KEYRING_MAGIC: Final = "certqueue-keyring 1"

_KID = re.compile(r"[a-z0-9]{1,32}")
log = logging.getLogger("certqueue.keystore")


@dataclass(frozen=True, repr=False)
class _KeyEntry:
    """One line of a keyring: how to get the key back, and the key itself."""

    kid: str
    key: bytes
    line: str  # the line as written to the file

    def __repr__(self) -> str:
        return f"_KeyEntry({self.kid})"


class KeyStore:
    """Encrypts and decrypts blobs with the active key; decrypts with any key of the keyring."""

    def __init__(self, keys: Mapping[str, bytes], active_kid: str) -> None:
        for kid, key in keys.items():
            if not _KID.fullmatch(kid):
                raise KeyStoreError(f"invalid key id {kid!r}", reason="keystore:bad_key_file")
            if len(key) != KEY_BYTES:
                raise KeyStoreError(f"key {kid} is not {KEY_BYTES} bytes", reason="keystore:bad_key_file")
        if active_kid not in keys:
            raise KeyStoreError(
                f"active key {active_kid!r} is not in the keyring", reason="keystore:bad_key_file"
            )
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}
        self._active = active_kid

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyStore:
        """Load a key file (see the module docstring), refusing one that others can read or write."""
        entries, active = _read_key_file(Path(path))
        return cls({e.kid: e.key for e in entries}, active)

    def __repr__(self) -> str:
        return f"KeyStore(active={self._active}, kids={sorted(self._ciphers)})"

    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._ciphers)

    @property
    def keyring_id(self) -> str:
        """Names this keyring (its kids and which is active), never its keys: what a process reports
        in its heartbeat."""
        material = ",".join(sorted(self._ciphers)) + ";" + self._active
        return "kr" + hashlib.sha256(material.encode("ascii")).hexdigest()[:16]

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt under the active key, bound to ``aad`` (the row it will be stored in)."""
        header = _header(self._active)
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + self._ciphers[self._active].encrypt(nonce, bytes(plaintext), header + aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob written by ``encrypt`` with the same ``aad``; any mismatch is a KeyStoreError."""
        kid, header, nonce, body = _parse_blob(blob)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise KeyStoreError(
                f"blob is under key {kid}, which is not in the keyring (retired too early, "
                "or the wrong key file)",
                reason="keystore:unknown_kid",
            )
        try:
            return cipher.decrypt(nonce, body, header + aad)
        except InvalidTag:
            raise KeyStoreError(
                f"cannot decrypt blob under key {kid}: wrong key file, blob stored for "
                "another row, or tampered data",
                reason="keystore:auth_failed",
            ) from None

    def kid_of(self, blob: bytes) -> str:
        return _parse_blob(blob)[0]

    def needs_rotation(self, blob: bytes) -> bool:
        """True when ``blob`` is not under the active key."""
        return self.kid_of(blob) != self._active


def reencrypt(store: KeyStore, blob: bytes, aad: bytes) -> bytes | None:
    """The blob re-encrypted under the active key, or None if it already is (one step of rotation)."""
    if not store.needs_rotation(blob):
        return None
    return store.encrypt(store.decrypt(blob, aad), aad)


# --- the process's keyring, reloaded when its file changes ----------------------------------------


@dataclass
class _Loaded:
    identity: tuple[int, int, int, int]
    store: KeyStore
    loaded_at: float  # time.time() of the load


_cache_lock = threading.Lock()
_cache: dict[str, _Loaded] = {}
_reload_hooks: list[Callable[[KeyStore], None]] = []


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def current(path: str | os.PathLike[str]) -> KeyStore:
    """The keyring in ``path`` as this process should use it now: loaded once, and again whenever
    the file is replaced or modified (key rotation on a running fleet)."""
    key = str(Path(path).resolve())
    loaded = _cache.get(key)
    try:
        ident = _identity(key)
    except OSError:
        if loaded is not None:
            return loaded.store  # the file vanished for a moment (an editor, a mount): keep the keys
        raise
    if loaded is not None and loaded.identity == ident:
        return loaded.store
    with _cache_lock:
        loaded = _cache.get(key)
        if loaded is not None and loaded.identity == ident:
            return loaded.store
        try:
            store = KeyStore.from_file(key)
        except KeyStoreError as exc:
            if loaded is None:
                raise
            # keep encrypting with the keys in force; `keys retire` refuses while this process
            # reports the old keyring, so nothing is lost
            log.error(
                "key file %s changed but does not load (%s); keeping keyring %s",
                key,
                exc.reason,
                loaded.store.keyring_id,
            )
            loaded.identity = ident
            return loaded.store
        fresh = _Loaded(identity=ident, store=store, loaded_at=time.time())
        _cache[key] = fresh
    if loaded is not None:
        log.info(
            "key file %s reloaded: active key %s (was %s)", key, store.active_kid, loaded.store.active_kid
        )
        for hook in list(_reload_hooks):
            hook(store)
    return store


def loaded_at(path: str | os.PathLike[str]) -> float | None:
    """When this process loaded the keyring it now holds for ``path`` (``time.time()``)."""
    loaded = _cache.get(str(Path(path).resolve()))
    return loaded.loaded_at if loaded else None


def on_reload(hook: Callable[[KeyStore], None]) -> None:
    """Call ``hook(new_store)`` after each reload of a changed key file (heartbeats)."""
    if hook not in _reload_hooks:
        _reload_hooks.append(hook)


def forget() -> None:
    """Drop every cached keyring (tests; a demo that writes a new key file)."""
    with _cache_lock:
        _cache.clear()


# --- key files ----------------------------------------------------------------------------------


def generate_key_file(
    path: str | os.PathLike[str],
    *,
    passphrase: str | None = None,
    overwrite: bool = False,
    iterations: int = PBKDF2_ITERATIONS,
) -> str:
    """Write a new keyring with one active key (random, or derived from ``passphrase``); returns its kid.

    The file is created 0600 whatever the umask, atomically; an existing file is an error unless
    ``overwrite`` (which loses every key in it: rows encrypted under them become unreadable).
    """
    entry = _new_entry(passphrase, iterations)
    _write_keyring(Path(path), [entry], entry.kid, exclusive=not overwrite)
    return entry.kid


def rotate_key_file(
    path: str | os.PathLike[str], *, passphrase: str | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Add a new active key (random, or from ``passphrase``) to the key file, keeping the old ones.

    Returns the new kid. The file is replaced atomically; a raw 32-byte file becomes a keyring.
    """
    p = Path(path)
    entries, _ = _read_key_file(p)
    new = _new_entry(passphrase, iterations)
    while new.kid in {e.kid for e in entries}:  # 40 random bits: only a paranoid loop
        new = _new_entry(passphrase, iterations)
    _write_keyring(p, [*entries, new], new.kid, exclusive=False)
    return new.kid


def retire_keys(path: str | os.PathLike[str], keep: set[str]) -> list[str]:
    """Remove from the key file every key not in ``keep``; the active key is always kept.

    Call only once no blob is under the removed kids any more. Returns the removed kids.
    """
    p = Path(path)
    entries, active = _read_key_file(p)
    kept = [e for e in entries if e.kid in keep or e.kid == active]
    removed = [e.kid for e in entries if e not in kept]
    if removed:
        _write_keyring(p, kept, active, exclusive=False)
    return removed


def _new_entry(passphrase: str | None, iterations: int) -> _KeyEntry:
    kid = "k" + secrets.token_hex(5)
    if passphrase is None:
        key = os.urandom(KEY_BYTES)
        return _KeyEntry(kid, key, f"key {kid} raw {_b64(key)}")
    if not isinstance(passphrase, str) or len(passphrase) < 8:
        raise KeyStoreError("a passphrase must be at least 8 characters", reason="keystore:weak_passphrase")
    if iterations < MIN_PBKDF2_ITERATIONS:
        raise KeyStoreError(
            f"PBKDF2 iterations below {MIN_PBKDF2_ITERATIONS}", reason="keystore:bad_key_file"
        )
    salt = os.urandom(SALT_BYTES)
    key = _derive(passphrase.encode("utf-8"), salt, iterations)
    line = f"key {kid} pbkdf2-sha256 {iterations} {_b64(salt)} {_b64(passphrase.encode('utf-8'))}"
    return _KeyEntry(kid, key, line)


def _derive(passphrase: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", passphrase, salt, iterations, dklen=KEY_BYTES)


def raw_kid(key: bytes) -> str:
    """The kid of a raw 32-byte key file: stable, reveals nothing usable about the key."""
    return "r" + hashlib.sha256(b"certqueue keystore kid\x00" + key).hexdigest()[:10]


def _read_key_file(path: Path) -> tuple[list[_KeyEntry], str]:
    data = read_private_file(path, missing_hint="; create one with `certqueue keys generate`")
    if len(data) == KEY_BYTES and not data.startswith(KEYRING_MAGIC.encode()):
        kid = raw_kid(data)
        return [_KeyEntry(kid, data, f"key {kid} raw {_b64(data)}")], kid
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_file(path, f"neither {KEY_BYTES} raw bytes nor a '{KEYRING_MAGIC}' keyring") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines or lines[0] != KEYRING_MAGIC:
        raise _bad_file(path, f"neither {KEY_BYTES} raw bytes nor a '{KEYRING_MAGIC}' keyring")
    entries: list[_KeyEntry] = []
    active: str | None = None
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if fields[0] == "active" and len(fields) == 2:
            if active is not None:
                raise _bad_file(path, "more than one 'active' line")
            active = fields[1]
        elif fields[0] == "key" and len(fields) >= 3:
            entry = _parse_key_line(path, lineno, fields, line)
            if any(e.kid == entry.kid for e in entries):
                raise _bad_file(path, f"key id {entry.kid} appears twice")
            entries.append(entry)
        else:
            # the line may hold key material: say where, never what
            raise _bad_file(path, f"unrecognized entry {lineno}")
    if active is None:
        raise _bad_file(path, "no 'active' line")
    if active not in {e.kid for e in entries}:
        raise _bad_file(path, f"the active key {active!r} is not in the file")
    return entries, active


def _parse_key_line(path: Path, lineno: int, fields: list[str], line: str) -> _KeyEntry:
    kid, kind = fields[1], fields[2]
    if not _KID.fullmatch(kid):
        raise _bad_file(path, f"entry {lineno}: key id must be 1 to 32 of a-z, 0-9")
    try:
        if kind == "raw" and len(fields) == 4:
            key = _unb64(fields[3])
            if len(key) != KEY_BYTES:
                raise _bad_file(path, f"entry {lineno}: a raw key is {KEY_BYTES} bytes")
            return _KeyEntry(kid, key, line)
        if kind == "pbkdf2-sha256" and len(fields) == 6:
            iterations = int(fields[3])
            if iterations < MIN_PBKDF2_ITERATIONS:
                raise _bad_file(path, f"entry {lineno}: PBKDF2 iterations below {MIN_PBKDF2_ITERATIONS}")
            salt, passphrase = _unb64(fields[4]), _unb64(fields[5])
            if len(salt) < SALT_BYTES or not passphrase:
                raise _bad_file(path, f"entry {lineno}: salt under {SALT_BYTES} bytes or empty passphrase")
            return _KeyEntry(kid, _derive(passphrase, salt, iterations), line)
    except (ValueError, binascii.Error):
        raise _bad_file(path, f"entry {lineno}: malformed number or base64") from None
    raise _bad_file(path, f"entry {lineno}: unknown key kind or wrong field count")


def read_private_file(path: str | os.PathLike[str], *, missing_hint: str = "") -> bytes:
    """The bytes of a secret file (at most 1 MiB), refusing one that group or others can access.

    Also used for the guide's ``account_key_path`` (an operator-provided account key PEM).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyStoreError(
            f"key file {path} does not exist{missing_hint}", reason="keystore:missing"
        ) from None
    except PermissionError:
        raise KeyStoreError(
            f"key file {path} is not readable by this user", reason="keystore:permissions"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyStoreError(f"key file {path} is not a regular file", reason="keystore:bad_key_file")
        if st.st_mode & 0o077:
            raise KeyStoreError(
                f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run `chmod 600 {path}`",
                reason="keystore:permissions",
            )
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read(1024 * 1024)


_read_private_file = read_private_file  # the name certqueue.acme.accounts imports


def _write_keyring(path: Path, entries: list[_KeyEntry], active: str, *, exclusive: bool) -> None:
    body = "\n".join(
        [
            KEYRING_MAGIC,
            "# certqueue master keys: keep this file secret (mode 0600) and backed up.",
            "# Do not remove a key while any stored blob is still under it (see `certqueue keys`).",
            *(e.line for e in entries),
            f"active {active}",
            "",
        ]
    ).encode("utf-8")
    _atomic_write_private(path, body, exclusive=exclusive)


def _atomic_write_private(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600, all or nothing.

    A temporary file in the same directory (created 0600 by mkstemp, then fchmod'd against odd
    umasks) is fsync'd, then renamed over ``path``; with ``exclusive`` it is hard-linked instead,
    which fails if ``path`` already exists.
    """
    directory = path.parent if str(path.parent) else Path(".")
    if exclusive and path.exists():
        raise KeyStoreError(
            f"key file {path} already exists; refusing to overwrite it", reason="keystore:exists"
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyStoreError(
                    f"key file {path} already exists; refusing to overwrite it", reason="keystore:exists"
                ) from None
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# --- blobs --------------------------------------------------------------------------------------


def _header(kid: str) -> bytes:
    encoded = kid.encode("ascii")
    return bytes([BLOB_VERSION, len(encoded)]) + encoded


def _parse_blob(blob: bytes) -> tuple[str, bytes, bytes, bytes]:
    """(kid, header, nonce, ciphertext+tag)."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise KeyStoreError(
            f"encrypted blob must be bytes, not {type(blob).__name__}", reason="keystore:malformed"
        )
    data = bytes(blob)
    if len(data) < 2 or data[0] != BLOB_VERSION:
        raise KeyStoreError("not a certqueue encrypted blob (unknown version)", reason="keystore:malformed")
    end = 2 + data[1]
    if len(data) < end + NONCE_BYTES + TAG_BYTES:
        raise KeyStoreError("encrypted blob is truncated", reason="keystore:malformed")
    try:
        kid = data[2:end].decode("ascii")
    except UnicodeDecodeError:
        kid = ""
    if not _KID.fullmatch(kid):
        raise KeyStoreError("encrypted blob has an invalid key id", reason="keystore:malformed")
    return kid, data[:end], data[end : end + NONCE_BYTES], data[end + NONCE_BYTES :]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _bad_file(path: Path, why: str) -> KeyStoreError:
    return KeyStoreError(f"key file {path} is malformed: {why}", reason="keystore:bad_key_file")
