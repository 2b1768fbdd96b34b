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
