"""The embedded default's broker: message files in a folder, written so no reader sees half a file.

Owns the folders under ``broker.filesystem_path`` (``out/`` ready messages, ``tmp/`` messages being
written, ``claimed/`` a message one consumer took, ``quarantine/`` messages nobody could decode,
``control/`` exchange tables) and the SQLite result file beside them. Nothing else writes there.

Why not kombu's ``filesystem://``: its producer creates the message file, then locks and writes it;
a consumer listing the folder in between reads an empty file, and the ``JSONDecodeError`` leaves the
consumer loop and ends the worker (kombu issue 1551). Here a producer writes the whole message under
``tmp/``, flushes and fsyncs it, and renames it into ``out/``: a rename is atomic within a file
system, so a message is either absent or complete. A consumer claims a message by renaming it from
``out/`` into ``claimed/`` (exactly one rename wins; the others get ``FileNotFoundError`` and move
on), then reads it. The exchange tables (used by fanout: remote control) are rewritten the same way
under a lock file. Why files and not kombu's SQLAlchemy transport on SQLite: docs/embedded-broker.md
(measured there; ``python -m bench.embedded_broker`` runs the comparison).

A message that cannot be decoded (not JSON, not a kombu envelope, a body that does not decode) is
moved to ``quarantine/``, logged once (its file name, queue, size and the kind of error: never its
content) and skipped; the consumer goes on with the next message. ``certqueue_broker_quarantined``
(certqueue.metrics) counts the files there.

Messages keep kombu's file names (``<time>_<uuid>.<queue>.msg``) and envelope, so messages left in
``out/`` by an older certqueue are consumed as before, and ``filesystem://`` settings map here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from certqueue.config import Settings

log = logging.getLogger("certqueue.embedded_broker")

#: the URL scheme Celery is given for the embedded broker (``filesystem://`` in settings maps here)
SCHEME = "certqueue-fs"
TRANSPORT = "certqueue.embedded_transport:Transport"

READY, STAGING, CLAIMED, QUARANTINE, CONTROL = "out", "tmp", "claimed", "quarantine", "control"
_SUFFIX = ".msg"
#: a claimed message not read after this many seconds belongs to a consumer that died
ORPHAN_SECONDS = 30.0
#: the longest one wait for messages lasts (a worker notices SIGTERM between two waits)
DRAIN_SLICE_SECONDS = 0.1


def is_embedded(url: str) -> bool:
    """True for a settings URL that means the embedded broker ("", ``filesystem://``, ours)."""
    return not url or url.startswith(("filesystem:", f"{SCHEME}:"))


def register() -> None:
    """Make ``certqueue-fs://`` resolve to this transport in kombu (idempotent)."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES[SCHEME] = TRANSPORT


def broker_urls(settings: Settings) -> tuple[str, str, dict[str, Any]]:
    """(broker url, result backend url, transport options) for the embedded default."""
    register()
    data = Path(settings.broker.filesystem_path).resolve()
    for sub in (READY, STAGING, CLAIMED, QUARANTINE, CONTROL):
        (data / sub).mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "data_folder_in": str(data / READY),
        "data_folder_out": str(data / READY),
        "control_folder": str(data / CONTROL),
        "polling_interval": 0.1,
    }
    backend = settings.broker.result_backend
    if not backend:
        results = data.parent / "celery-results.db"
        prepare_result_store(results)
        # pysqlite reads ``timeout`` from the URL: wait for a writer instead of failing at 5 s
        backend = f"db+sqlite:///{results}?timeout=30"
    return f"{SCHEME}://", backend, opts


_prepared: set[Path] = set()


def prepare_result_store(path: Path) -> None:
    """WAL mode on the SQLite result file (persistent in the file): chords poll results while
    workers write them, and in the default rollback mode a reader blocks every writer. Once per
    file and process (the metrics scrape calls this through ``broker_urls``)."""
    if path in _prepared:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
        _prepared.add(path)
    except sqlite3.Error as exc:  # a busy file at start-up: rollback mode still works, only slower
        log.warning("result store %s: WAL not set (%s)", path, type(exc).__name__)


# --- reading the folders (metrics, CLI) ------------------------------------------------------------


def queue_of(filename: str) -> str | None:
    """The queue a message file belongs to, or None for anything that is not a message file."""
    if not filename.endswith(_SUFFIX) or filename.startswith("."):
        return None
    return filename.partition(".")[2].removesuffix(_SUFFIX) or None


def _count(folder: Path, names: Iterable[str]) -> dict[str, int] | None:
    try:
        files = os.listdir(folder)
    except OSError:
        return None
    out = dict.fromkeys(names, 0)
    for fname in files:
        queue = queue_of(fname)
        if queue in out:
            out[queue] += 1
    return out


def queue_depths(settings: Settings, names: Iterable[str]) -> dict[str, int] | None:
    """Messages waiting per queue (ready plus claimed-not-yet-read), None if the folder is missing."""
    data = Path(settings.broker.filesystem_path).resolve()
    ready = _count(data / READY, names)
    if ready is None:
        return None
    for queue, n in (_count(data / CLAIMED, ready) or {}).items():
        ready[queue] += n
    return ready


def quarantined(settings: Settings) -> dict[str, int]:
    """Quarantined message files per queue (the queue named in the file name)."""
    folder = Path(settings.broker.filesystem_path).resolve() / QUARANTINE
    try:
        files = os.listdir(folder)
    except OSError:
        return {}
    out: dict[str, int] = {}
    for fname in files:
        queue = queue_of(fname)
        if queue is not None:
            out[queue] = out.get(queue, 0) + 1
    return out


# --- the transport ----------------------------------------------------------------------------------


class UndecodableMessage(ValueError):
    """A message file whose content is not a kombu message (the reason is safe to log)."""


def decode_message(raw: bytes) -> dict[str, Any]:
    """The kombu envelope in ``raw``, checked as far as kombu's Message and Celery will read it,
    so nothing they raise on can reach the consumer loop."""
    if not raw:
        raise UndecodableMessage("empty file")
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UndecodableMessage(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise UndecodableMessage("not a JSON object")
    props = payload.get("properties")
    if not isinstance(props, dict) or not isinstance(props.get("delivery_tag"), str):
        raise UndecodableMessage("no properties.delivery_tag")
    info = props.get("delivery_info")
    if not isinstance(info, dict):
        raise UndecodableMessage("no properties.delivery_info")
    body = payload.get("body")
    if body is None:
        raise UndecodableMessage("no body")
    if props.get("body_encoding") == "base64":
        if not isinstance(body, str):
            raise UndecodableMessage("base64 body is not a string")
        try:
            decoded = base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise UndecodableMessage("body is not base64") from None
    else:
        decoded = body.encode("utf-8") if isinstance(body, str) else b""
    if payload.get("content-type") == "application/json":
        try:
            json.loads(decoded)
        except (UnicodeDecodeError, ValueError) as exc:
            raise UndecodableMessage(f"body is not JSON ({type(exc).__name__})") from None
    return payload


def _write_atomically(target: Path, staging: Path, data: bytes, *, fsync: bool) -> None:
    """Write ``data`` under ``staging`` (same file system), then rename it to ``target``."""
    tmp = staging / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
