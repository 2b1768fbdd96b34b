"""certqueue.keystore: behaviours ``make mutation`` found untested.

* The kid of a raw 32-byte key file is derived, and must never change: every blob stores the kid it
  was sealed under, so a different derivation would make every row written before an upgrade
  unreadable (``keystore:unknown_kid``). Pinned to a known answer.
* A malformed key file is refused with an error that names the file and says what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from certqueue.errors import KeyStoreError
from certqueue.keystore import BLOB_VERSION, NONCE_BYTES, TAG_BYTES, KeyStore


def _private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def test_the_kid_of_a_raw_key_file_is_stable(tmp_path: Path) -> None:
    path = _private(tmp_path / "raw.key", bytes(range(32)))
    store = KeyStore.from_file(path)
    assert store.active_kid == "r51e9ca17cf"  # computed once by certqueue 0.1; never to change
    blob = store.encrypt(b"secret", b"aad")
    assert KeyStore.from_file(path).decrypt(blob, b"aad") == b"secret"


def test_a_malformed_key_file_error_names_the_file_and_the_problem(tmp_path: Path) -> None:
    path = _private(tmp_path / "short.key", b"x" * 31)
    with pytest.raises(KeyStoreError) as info:
        KeyStore.from_file(path)
    assert str(info.value) == (
        f"key file {path} is malformed: neither 32 raw bytes nor a 'certqueue-keyring 1' keyring"
    )
    assert info.value.reason == "keystore:bad_key_file"


V = BLOB_VERSION
PAD = bytes(NONCE_BYTES + TAG_BYTES)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        ("text", "encrypted blob must be bytes, not str"),
        (None, "encrypted blob must be bytes, not NoneType"),
        (b"", "not a certqueue encrypted blob (unknown version)"),
        (bytes([V]), "not a certqueue encrypted blob (unknown version)"),
        (bytes([V + 1, 2]) + b"k1" + PAD, "not a certqueue encrypted blob (unknown version)"),
        (bytes([V, 0]), "encrypted blob is truncated"),
        (bytes([V, 2]) + b"k1" + PAD[:-1], "encrypted blob is truncated"),
        (bytes([V, 0]) + PAD, "encrypted blob has an invalid key id"),
        (bytes([V, 2, 0xFF, 0xFE]) + PAD, "encrypted blob has an invalid key id"),
        (bytes([V, 2]) + b"K!" + PAD, "encrypted blob has an invalid key id"),
    ],
)
def test_a_malformed_blob_is_refused_with_a_stable_reason(blob: object, message: str) -> None:
    """What a row's damaged ``key_enc`` gives: never a crash, a KeyStoreError with the reason that
    metrics and task results carry (``keystore:malformed``) and a message saying what is wrong."""
    store = KeyStore({"k1": bytes(32)}, "k1")
    with pytest.raises(KeyStoreError) as info:
        store.decrypt(blob, b"aad")  # type: ignore[arg-type]
    assert (str(info.value), info.value.reason) == (message, "keystore:malformed")


@pytest.mark.parametrize(
    ("keys", "active", "message"),
    [
        ({"K1": bytes(32)}, "K1", "invalid key id 'K1'"),
        ({"k1": bytes(16)}, "k1", "key k1 is not 32 bytes"),
        ({"k1": bytes(32)}, "k2", "active key 'k2' is not in the keyring"),
    ],
)
def test_a_bad_keyring_is_refused_with_a_stable_reason(
    keys: dict[str, bytes], active: str, message: str
) -> None:
    with pytest.raises(KeyStoreError) as info:
        KeyStore(keys, active)
    assert (str(info.value), info.value.reason) == (message, "keystore:bad_key_file")


# --- the process's keyring: current(), loaded_at(), reload hooks --------------------------------------


def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> list[KeyStore]:
    """An empty keyring cache and one recording reload hook, for this test only."""
    from certqueue import keystore

    monkeypatch.setattr(keystore, "_cache", {})
    reloaded: list[KeyStore] = []
    monkeypatch.setattr(keystore, "_reload_hooks", [reloaded.append])
    return reloaded


def test_loaded_at_is_when_this_process_loaded_the_keyring_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from certqueue import keystore

    _fresh_cache(monkeypatch)
    path = tmp_path / "master.key"
    keystore.generate_key_file(path)
    assert keystore.loaded_at(path) is None  # not loaded yet
    monkeypatch.setattr(keystore.time, "time", lambda: 1_000_000_000.0)
    keystore.current(path)
    assert keystore.loaded_at(path) == 1_000_000_000.0
    assert keystore.loaded_at(tmp_path / "." / "master.key") == 1_000_000_000.0  # the same file
    assert keystore.loaded_at(tmp_path / "other.key") is None


def test_a_key_file_that_vanishes_for_a_moment_keeps_the_keyring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from certqueue import keystore

    _fresh_cache(monkeypatch)
    path = tmp_path / "master.key"
    keystore.generate_key_file(path)
    store = keystore.current(path)
    path.rename(tmp_path / "moved.key")  # an editor's save, a remount
    assert keystore.current(path) is store
    with pytest.raises(FileNotFoundError):
        keystore.current(tmp_path / "never.key")  # a file never loaded: the error stands


def test_a_reload_is_logged_and_handed_to_the_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from certqueue import keystore

    reloaded = _fresh_cache(monkeypatch)
    path = tmp_path / "master.key"
    old_kid = keystore.generate_key_file(path)
    keystore.current(path)
    new_kid = keystore.rotate_key_file(path)
    with caplog.at_level("INFO", logger="certqueue.keystore"):
        store = keystore.current(path)
    assert store.active_kid == new_kid and reloaded == [store]
    assert [r.getMessage() for r in caplog.records] == [
        f"key file {path.resolve()} reloaded: active key {new_kid} (was {old_kid})"
    ]


def test_a_changed_key_file_that_does_not_load_is_logged_once_and_the_keyring_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from certqueue import keystore

    reloaded = _fresh_cache(monkeypatch)
    path = tmp_path / "master.key"
    keystore.generate_key_file(path)
    store = keystore.current(path)
    _private(path, b"certqueue-keyring 1\nnot a key line\n")
    with caplog.at_level("INFO", logger="certqueue.keystore"):
        assert keystore.current(path) is store
        assert keystore.current(path) is store  # the same broken file: not read again, not logged again
    assert [r.getMessage() for r in caplog.records] == [
        f"key file {path.resolve()} changed but does not load (keystore:bad_key_file); "
        f"keeping keyring {store.keyring_id}"
    ]
    assert reloaded == []


def test_a_new_key_whose_kid_is_taken_is_drawn_again_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kid-collision loop (40 random bits: reached here by forcing the first draw to collide)."""
    from certqueue import keystore

    path = tmp_path / "master.key"
    taken = keystore.generate_key_file(path)
    draws = iter([taken[1:], "0123456789"])
    monkeypatch.setattr(keystore.secrets, "token_hex", lambda _n: next(draws))
    new_kid = keystore.rotate_key_file(path, passphrase="a long passphrase", iterations=100_000)
    assert new_kid == "k0123456789"
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith(f"key {new_kid} "))
    assert line.split()[2:4] == ["pbkdf2-sha256", "100000"]  # the redrawn key keeps passphrase and count
    assert KeyStore.from_file(path).kids == {taken, new_kid}


def test_a_blob_that_does_not_decrypt_says_why_in_full(tmp_path: Path) -> None:
    from certqueue import keystore

    path = tmp_path / "master.key"
    keystore.generate_key_file(path)
    store = KeyStore.from_file(path)
    blob = store.encrypt(b"secret", b"issuances:1:key")
    with pytest.raises(KeyStoreError) as exc:
        store.decrypt(blob, b"issuances:2:key")  # stored for another row
    assert (exc.value.reason, exc.value.message) == (
        "keystore:auth_failed",
        f"cannot decrypt blob under key {store.active_kid}: wrong key file, blob stored for another row, "
        "or tampered data",
    )
    other = tmp_path / "other.key"
    keystore.generate_key_file(other)
    with pytest.raises(KeyStoreError) as exc:
        KeyStore.from_file(other).decrypt(blob, b"issuances:1:key")
    assert (exc.value.reason, exc.value.message) == (
        "keystore:unknown_kid",
        f"blob is under key {store.active_kid}, which is not in the keyring (retired too early, "
        "or the wrong key file)",
    )


def _load_refusal(path: Path) -> tuple[str, str]:
    """(reason, message) of the KeyStoreError that loading ``path`` raises."""
    with pytest.raises(KeyStoreError) as exc:
        KeyStore.from_file(path)
    return exc.value.reason, exc.value.message


def test_a_key_line_whose_base64_holds_a_stray_character_is_refused(tmp_path: Path) -> None:
    """Strict base64: a character outside the alphabet is an error, not silently dropped (which would
    load a key from a damaged line)."""
    import base64

    good = base64.b64encode(bytes(range(32))).decode()
    damaged = f"certqueue-keyring 1\nkey k1 raw {good[:8]}!{good[8:]}\nactive k1\n"
    path = _private(tmp_path / "k.key", damaged.encode())
    assert _load_refusal(path)[1] == f"key file {path} is malformed: entry 2: malformed number or base64"


def test_a_key_file_that_is_not_utf8_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _private(tmp_path / "binary.key", b"\xff\xfe" * 20)  # 40 bytes: not raw, not text
    assert _load_refusal(path) == (
        "keystore:bad_key_file",
        f"key file {path} is malformed: neither 32 raw bytes nor a 'certqueue-keyring 1' keyring",
    )


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


SALT, PASS = _b64(bytes(range(16))), _b64(b"a long passphrase")


@pytest.mark.parametrize(
    ("key_line", "why"),
    [
        (f"key K1 raw {_b64(bytes(32))}", "key id must be 1 to 32 of a-z, 0-9"),
        (f"key k1 raw {_b64(bytes(16))}", "a raw key is 32 bytes"),
        (f"key k1 pbkdf2-sha256 99999 {SALT} {PASS}", "PBKDF2 iterations below 100000"),
        (
            f"key k1 pbkdf2-sha256 100000 {_b64(bytes(15))} {PASS}",
            "salt under 16 bytes or empty passphrase",
        ),
        (f"key k1 pbkdf2-sha256 many {SALT} {PASS}", "malformed number or base64"),
        (f"key k1 scrypt 100000 {SALT} {PASS}", "unknown key kind or wrong field count"),
        (f"key k1 pbkdf2-sha256 100000 {SALT}", "unknown key kind or wrong field count"),
        ("key k1 raw", "unknown key kind or wrong field count"),  # the shortest line read as a key
    ],
)
def test_a_bad_key_line_is_refused_naming_the_file_the_entry_and_the_problem(
    tmp_path: Path, key_line: str, why: str
) -> None:
    """Every refusal of a ``key`` line says which file, which entry, and what is wrong with it."""
    path = _private(tmp_path / "k.key", f"certqueue-keyring 1\n{key_line}\nactive k1\n".encode())
    assert _load_refusal(path) == (
        "keystore:bad_key_file",
        f"key file {path} is malformed: entry 2: {why}",
    )


def test_a_passphrase_key_at_exactly_the_minimum_iterations_loads(tmp_path: Path) -> None:
    import hashlib

    line = f"key k1 pbkdf2-sha256 100000 {SALT} {PASS}"
    path = _private(tmp_path / "k.key", f"certqueue-keyring 1\n{line}\nactive k1\n".encode())
    store = KeyStore.from_file(path)
    expected = hashlib.pbkdf2_hmac("sha256", b"a long passphrase", bytes(range(16)), 100_000, dklen=32)
    blob = KeyStore({"k1": expected}, "k1").encrypt(b"secret", b"aad")
    assert store.decrypt(blob, b"aad") == b"secret"


def test_rotating_keeps_a_passphrase_key_line_verbatim(tmp_path: Path) -> None:
    """The old entries are written back as they were read, so the old key still derives the same."""
    from certqueue import keystore

    path = tmp_path / "master.key"
    old_kid = keystore.generate_key_file(path, passphrase="a long passphrase", iterations=100_000)
    old_line = next(ln for ln in path.read_text().splitlines() if ln.startswith(f"key {old_kid} "))
    blob = KeyStore.from_file(path).encrypt(b"secret", b"aad")
    new_kid = keystore.rotate_key_file(path)
    lines = path.read_text().splitlines()
    assert old_line in lines
    assert f"active {new_kid}" in lines
    assert KeyStore.from_file(path).decrypt(blob, b"aad") == b"secret"


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        ("active k1\nactive k1\n", "more than one 'active' line"),
        ("active k1 k2\n", "unrecognized entry 3"),
        ("", "no 'active' line"),
        ("active k2\n", "the active key 'k2' is not in the file"),
    ],
)
def test_a_bad_active_line_is_refused_naming_the_file_and_the_problem(
    tmp_path: Path, tail: str, why: str
) -> None:
    text = f"certqueue-keyring 1\nkey k1 raw {_b64(bytes(32))}\n{tail}"
    path = _private(tmp_path / "k.key", text.encode())
    assert _load_refusal(path) == (
        "keystore:bad_key_file",
        f"key file {path} is malformed: {why}",
    )


def test_a_kid_that_appears_twice_is_refused_naming_the_file_and_the_kid(tmp_path: Path) -> None:
    """Two keys under one kid: a blob's kid could not say which key sealed it."""
    text = (
        f"certqueue-keyring 1\nkey k1 raw {_b64(bytes(32))}\nkey k1 raw {_b64(bytes(range(32)))}\nactive k1\n"
    )
    path = _private(tmp_path / "k.key", text.encode())
    assert _load_refusal(path) == (
        "keystore:bad_key_file",
        f"key file {path} is malformed: key id k1 appears twice",
    )


# --- read_private_file: what a secret file must be -------------------------------------------------------


def test_a_path_that_is_no_regular_file_is_refused_naming_it(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    assert _load_refusal(d) == ("keystore:bad_key_file", f"key file {d} is not a regular file")


def test_a_key_file_this_user_may_not_open_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's EACCES is simulated: the tests run as root here, where no mode forbids a read."""
    from certqueue import keystore

    path = _private(tmp_path / "k.key", bytes(32))
    real_open = os.open

    def open_refused(file: object, *args: object, **kwargs: object) -> int:
        if Path(str(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(keystore.os, "open", open_refused)
    assert _load_refusal(path) == ("keystore:permissions", f"key file {path} is not readable by this user")


def test_a_secret_file_is_read_up_to_one_mib_and_no_further(tmp_path: Path) -> None:
    """A secret is small: a huge file named by mistake costs 1 MiB of memory, not its size."""
    from certqueue.keystore import read_private_file

    path = _private(tmp_path / "big.pem", bytes(range(256)) * (8 * 1024))  # 2 MiB
    data = read_private_file(path)
    assert data == path.read_bytes()[: 1024 * 1024]


# --- new keys and the keyring file as written -----------------------------------------------------------


@pytest.mark.parametrize("passphrase", [None, "eight ch"])
def test_a_new_kid_is_k_and_ten_hex_digits(tmp_path: Path, passphrase: str | None) -> None:
    """40 random bits, the form the docs show (``k3f9c01d2a7``), distinct from a raw file's ``r...``."""
    import re

    from certqueue import keystore

    kid = keystore.generate_key_file(tmp_path / "k.key", passphrase=passphrase, iterations=100_000)
    assert re.fullmatch(r"k[0-9a-f]{10}", kid)
    assert KeyStore.from_file(tmp_path / "k.key").active_kid == kid


@pytest.mark.parametrize("passphrase", ["seven c", b"a long passphrase as bytes"])
def test_a_passphrase_under_eight_characters_or_not_text_is_refused_with_a_stable_reason(
    tmp_path: Path, passphrase: object
) -> None:
    from certqueue import keystore

    with pytest.raises(KeyStoreError) as info:
        keystore.generate_key_file(tmp_path / "k.key", passphrase=passphrase)  # type: ignore[arg-type]
    assert (info.value.reason, info.value.message) == (
        "keystore:weak_passphrase",
        "a passphrase must be at least 8 characters",
    )
    assert not (tmp_path / "k.key").exists()


def test_a_passphrase_of_exactly_eight_characters_is_accepted(tmp_path: Path) -> None:
    from certqueue import keystore

    kid = keystore.generate_key_file(tmp_path / "k.key", passphrase="8 chars!", iterations=100_000)
    assert KeyStore.from_file(tmp_path / "k.key").active_kid == kid


def test_a_new_passphrase_key_under_the_minimum_iterations_is_refused_with_a_stable_reason(
    tmp_path: Path,
) -> None:
    from certqueue import keystore

    with pytest.raises(KeyStoreError) as info:
        keystore.generate_key_file(tmp_path / "k.key", passphrase="a long passphrase", iterations=99_999)
    assert (info.value.reason, info.value.message) == (
        "keystore:bad_key_file",
        "PBKDF2 iterations below 100000",
    )
    assert not (tmp_path / "k.key").exists()


def test_a_generated_keyring_is_the_documented_text(tmp_path: Path) -> None:
    """Magic line, the two comments that tell an operator how to keep it, the key, the active line."""
    from certqueue import keystore

    path = tmp_path / "k.key"
    kid = keystore.generate_key_file(path)
    lines = path.read_text().split("\n")
    assert lines[:3] == [
        "certqueue-keyring 1",
        "# certqueue master keys: keep this file secret (mode 0600) and backed up.",
        "# Do not remove a key while any stored blob is still under it (see `certqueue keys`).",
    ]
    assert lines[3].startswith(f"key {kid} raw ") and lines[4:] == [f"active {kid}", ""]


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[Path, Path]]:
    """Record the (source, destination) of every ``os.<name>`` (replace or link) keystore makes."""
    from certqueue import keystore

    real = getattr(os, name)
    calls: list[tuple[Path, Path]] = []

    def spy(src: str, dst: str) -> None:
        calls.append((Path(src), Path(dst)))
        real(src, dst)

    monkeypatch.setattr(keystore.os, name, spy)
    return calls


@pytest.mark.parametrize(("write", "call"), [("generate", "link"), ("rotate", "replace")])
def test_a_key_file_is_written_as_a_hidden_temporary_beside_it_then_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: str, call: str
) -> None:
    """Beside it, so the rename stays on one filesystem (atomic); named after it and hidden, so a
    leftover from a crash says what it was and is not taken for a key file."""
    import re

    from certqueue import keystore

    path = tmp_path / "master.key"
    if write == "rotate":
        keystore.generate_key_file(path)
    calls = _spy(monkeypatch, call)
    if write == "rotate":
        keystore.rotate_key_file(path)
    else:
        keystore.generate_key_file(path)
    ((src, dst),) = calls
    assert dst == path and src.parent == tmp_path
    assert re.fullmatch(r"\.master\.key\.[^.]+\.tmp", src.name), src.name
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]


def test_a_key_file_that_appears_while_one_is_generated_is_kept_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``keys generate`` at once: the one that links second fails with keystore:exists, the first
    one's file is kept as it was, and no temporary is left."""
    import tempfile

    from certqueue import keystore

    path = tmp_path / "master.key"
    real_mkstemp = tempfile.mkstemp

    def the_other_one_wins(*args: object, **kwargs: object) -> tuple[int, str]:
        _private(path, b"the other generate's keyring")  # after the exists check, before the link
        return real_mkstemp(*args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(keystore.tempfile, "mkstemp", the_other_one_wins)
    with pytest.raises(KeyStoreError) as info:
        keystore.generate_key_file(path)
    assert (info.value.reason, info.value.message) == (
        "keystore:exists",
        f"key file {path} already exists; refusing to overwrite it",
    )
    assert path.read_bytes() == b"the other generate's keyring"
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]


def test_an_interrupt_after_the_rename_is_raised_as_itself_and_the_new_file_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once renamed, the temporary is gone: the clean-up finds nothing to remove and must not turn
    the interrupt into another error."""
    from certqueue import keystore

    path = tmp_path / "master.key"
    old = keystore.generate_key_file(path)

    def interrupted(directory: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(keystore, "_fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        keystore.rotate_key_file(path)
    monkeypatch.undo()
    store = KeyStore.from_file(path)
    assert old in store.kids and store.active_kid != old


def test_syncing_the_directory_is_best_effort(tmp_path: Path) -> None:
    """A directory that cannot be opened (some filesystems) is no error: the file is already written."""
    from certqueue import keystore

    assert keystore._fsync_dir(tmp_path / "no such directory") is None
