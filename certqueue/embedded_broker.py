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
import fcntl
import json
import logging
import os
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import filesystem as kombu_fs
from kombu.utils.json import dumps

if TYPE_CHECKING:
    from certqueue.config import Settings

log = logging.getLogger("certqueue.embedded_broker")

#: the URL scheme Celery is given for the embedded broker (``filesystem://`` in settings maps here)
SCHEME = "certqueue-fs"
TRANSPORT = "certqueue.embedded_broker:Transport"

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


class Channel(kombu_fs.Channel):
    """kombu's filesystem channel with atomic writes, claim-by-rename and a quarantine."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listed: dict[str, deque[str]] = {}
        self._swept = 0.0

    # folders ------------------------------------------------------------------------------------
    @property
    def _ready(self) -> Path:
        return Path(self.data_folder_out)

    @property
    def _data(self) -> Path:
        return self._ready.parent

    @property
    def _fsync(self) -> bool:
        return bool(self.transport_options.get("fsync", True))

    # messages -----------------------------------------------------------------------------------
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # kombu's name: the time sorts the folder roughly first-in first-out
        name = f"{time.time_ns():020d}_{uuid.uuid4().hex}.{queue}{_SUFFIX}"
        try:
            _write_atomically(
                self._ready / name, self._data / STAGING, dumps(payload).encode("utf-8"), fsync=self._fsync
            )
        except OSError as exc:
            raise ChannelError(f"cannot add message {name!r} to {self._ready}") from exc

    def _candidates(self, queue: str) -> deque[str]:
        """Ready files of ``queue``, oldest first, from one listing reused until it is used up
        (listing the folder once per message would make draining n messages cost n^2)."""
        pending = self._listed.get(queue)
        if not pending:
            self._sweep_claimed()
            try:
                names = os.listdir(self._ready)
            except OSError as exc:
                raise ChannelError(f"cannot list {self._ready}") from exc
            pending = deque(sorted(n for n in names if queue_of(n) == queue))
            self._listed[queue] = pending
        return pending

    def _sweep_claimed(self) -> None:
        """Put back messages a consumer claimed and never read: it died between the rename and the
        read (microseconds apart), so a claim older than ``ORPHAN_SECONDS`` has no owner left.
        A rename sets the file's ctime, so ctime is when the claim was made."""
        now = time.time()
        if now - self._swept < ORPHAN_SECONDS:
            return
        self._swept = now
        claimed_dir = self._data / CLAIMED
        with contextlib.suppress(OSError):
            for name in os.listdir(claimed_dir):
                path = claimed_dir / name
                with contextlib.suppress(OSError):
                    if queue_of(name) and now - path.stat().st_ctime > ORPHAN_SECONDS:
                        os.rename(path, self._ready / name)
                        log.warning("message %s claimed by a consumer that is gone: put back", name)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        pending = self._candidates(queue)
        claimed_dir = self._data / CLAIMED
        while pending:
            name = pending.popleft()
            claimed = claimed_dir / name
            try:
                os.rename(self._ready / name, claimed)  # the one atomic step: one consumer wins
            except FileNotFoundError:
                continue  # another consumer took it
            except OSError as exc:
                raise ChannelError(f"cannot claim {name!r}") from exc
            try:
                raw = claimed.read_bytes()
            except OSError as exc:
                raise ChannelError(f"cannot read claimed message {name!r}") from exc
            try:
                payload = decode_message(raw)
            except UndecodableMessage as exc:
                self._quarantine(claimed, queue, len(raw), str(exc))
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claimed)
            return payload
        raise Empty()

    def _quarantine(self, path: Path, queue: str, size: int, reason: str) -> None:
        target = self._data / QUARANTINE / path.name
        try:
            os.replace(path, target)
        except OSError as exc:
            # never leave it where a consumer would read it again
            with contextlib.suppress(OSError):
                os.unlink(path)
            log.error(
                "undecodable message %s on queue %s (%d bytes: %s) could not be quarantined (%s); deleted",
                path.name,
                queue,
                size,
                reason,
                type(exc).__name__,
            )
            return
        log.error(
            "undecodable message %s on queue %s (%d bytes: %s) moved to %s",
            path.name,
            queue,
            size,
            reason,
            target.parent,
        )

    def _purge(self, queue: str) -> int:
        self._listed.pop(queue, None)
        count = 0
        for name in os.listdir(self._ready):
            if queue_of(name) == queue:
                with contextlib.suppress(OSError):
                    os.unlink(self._ready / name)
                    count += 1
        return count

    def _size(self, queue: str) -> int:
        return sum(1 for name in os.listdir(self._ready) if queue_of(name) == queue)

    # exchange tables (fanout) -------------------------------------------------------------------
    @contextlib.contextmanager
    def _table_lock(self) -> Iterator[None]:
        self.control_folder.mkdir(parents=True, exist_ok=True)
        with open(self.control_folder / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _read_table(self, exchange: str) -> list[kombu_fs.exchange_queue_t]:
        file = self._exchange_file(exchange)
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"cannot open {file}") from exc
        try:
            return [kombu_fs.exchange_queue_t(*q) for q in json.loads(raw)]
        except (ValueError, TypeError):
            # only kombu's own writer could leave this (it truncates, then writes): rebuilt on the
            # next bind; until then the exchange has no queues
            log.warning("exchange table %s unreadable; treated as empty", file.name)
            return []

    def _write_table(self, exchange: str, queues: list[kombu_fs.exchange_queue_t]) -> None:
        file = self._exchange_file(exchange)
        try:
            _write_atomically(file, self.control_folder, dumps(queues).encode("utf-8"), fsync=self._fsync)
        except OSError as exc:
            raise ChannelError(f"cannot write {file}") from exc

    def get_table(self, exchange: str) -> list[kombu_fs.exchange_queue_t]:
        return self._read_table(exchange)

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        entry = kombu_fs.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        with self._table_lock():
            queues = self._read_table(exchange)
            if entry not in queues:
                self._write_table(exchange, [entry, *queues])

    def _delete(
        self, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any, **kwargs: Any
    ) -> None:
        # the virtual channel's bookkeeping, then our table (kombu's own _delete rewrites in place)
        super(kombu_fs.Channel, self)._delete(queue, exchange, routing_key, pattern, *args, **kwargs)
        entry = kombu_fs.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        with self._table_lock():
            queues = self._read_table(exchange)
            if entry in queues:
                self._write_table(exchange, [q for q in queues if q != entry])


class Transport(kombu_fs.Transport):
    """The embedded broker (``certqueue-fs://``)."""

    Channel = Channel
    driver_type = "filesystem"
    driver_name = "certqueue-fs"

    def drain_events(self, connection: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        # celery's blocking loop (this transport has no event loop) looks at a pending SIGTERM only
        # between two calls, each of them up to 2 s: it now hears it within DRAIN_SLICE_SECONDS
        if kwargs.get("timeout") is not None:
            kwargs["timeout"] = min(kwargs["timeout"], DRAIN_SLICE_SECONDS)
        return super().drain_events(connection, **kwargs)
