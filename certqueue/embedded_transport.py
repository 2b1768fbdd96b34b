"""The embedded broker's kombu transport (``certqueue-fs://``): kombu's filesystem channel with
atomic writes, claim-by-rename and a quarantine. The folder layout and the reading side (depths,
the quarantine, decoding a message file) are in certqueue.embedded_broker, which needs no kombu.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem as kombu_fs
from kombu.utils.json import dumps

from certqueue import embedded_broker as layout  # its timings are read when used (tests set them)
from certqueue.embedded_broker import (
    _SUFFIX,
    CLAIMED,
    QUARANTINE,
    STAGING,
    UndecodableMessage,
    _write_atomically,
    decode_message,
    log,
    queue_of,
)


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
        if now - self._swept < layout.ORPHAN_SECONDS:
            return
        self._swept = now
        claimed_dir = self._data / CLAIMED
        with contextlib.suppress(OSError):
            for name in os.listdir(claimed_dir):
                path = claimed_dir / name
                with contextlib.suppress(OSError):
                    if queue_of(name) and now - path.stat().st_ctime > layout.ORPHAN_SECONDS:
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
            kwargs["timeout"] = min(kwargs["timeout"], layout.DRAIN_SLICE_SECONDS)
        return super().drain_events(connection, **kwargs)
