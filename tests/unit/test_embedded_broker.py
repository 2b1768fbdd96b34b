"""The embedded broker (certqueue.embedded_broker) in one process, through kombu's own API."""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from certqueue import embedded_broker, embedded_transport
from certqueue.celery_app import broker_urls
from certqueue.config import BrokerSettings, Settings

MARKER = "cq-marker-5e2b"  # stands for message content that must never reach a log


def _settings(folder: Path, url: str = "") -> Settings:
    return Settings(broker=BrokerSettings(url=url, filesystem_path=folder))


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[tuple[Connection, Path, Settings]]:
    settings = _settings(tmp_path / "broker")
    url, _backend, opts = broker_urls(settings)
    with Connection(url, transport_options=opts) as conn:
        yield conn, tmp_path / "broker", settings


def _envelope(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {
        "body": base64.b64encode(body).decode(),
        "content-type": content_type,
        "content-encoding": "utf-8",
        "headers": {},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "d0c8a1e2-0000-4000-8000-000000000000",
            "delivery_info": {"exchange": "", "routing_key": "acme"},
            "delivery_mode": 2,
            "priority": 0,
        },
    }


def _drain(conn: Connection, queue: str, want: int, timeout: float = 10.0) -> list[Any]:
    got: list[Any] = []
    q = Queue(queue, routing_key=queue)

    def on_message(body: Any, message: Any) -> None:
        got.append(body)
        message.ack()

    with conn.Consumer(q, callbacks=[on_message], accept=["json"]):
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
    return got


@pytest.mark.parametrize("url", ["", "filesystem://", "filesystem:///ignored", "certqueue-fs://"])
def test_embedded_urls_map_to_the_safe_transport(tmp_path: Path, url: str) -> None:
    got_url, backend, opts = broker_urls(_settings(tmp_path / "broker", url))
    assert got_url == "certqueue-fs://"
    assert Connection(got_url, transport_options=opts).transport_cls == embedded_broker.SCHEME
    assert type(Connection(got_url, transport_options=opts).transport) is embedded_transport.Transport
    assert opts["control_folder"].startswith(str(tmp_path))  # not ./control in the working directory
    assert backend == f"db+sqlite:///{tmp_path / 'celery-results.db'}?timeout=30"


def test_result_store_is_put_in_wal_mode(tmp_path: Path) -> None:
    import sqlite3

    broker_urls(_settings(tmp_path / "broker"))
    with sqlite3.connect(tmp_path / "celery-results.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_round_trip_leaves_nothing_behind(broker: tuple[Connection, Path, Settings]) -> None:
    conn, folder, _ = broker
    producer = conn.Producer(serializer="json")
    for i in range(5):
        producer.publish({"n": i}, routing_key="acme")
    assert sorted(b["n"] for b in _drain(conn, "acme", 5)) == list(range(5))
    for sub in ("out", "tmp", "claimed", "quarantine"):
        assert os.listdir(folder / sub) == [], sub


def test_a_half_written_file_is_never_visible(broker: tuple[Connection, Path, Settings]) -> None:
    """A producer's file appears in out/ only complete: while it is written it lives in tmp/."""
    _conn, folder, _ = broker
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def fsync_and_look(fd: int) -> None:  # the moment between the write and the rename
        seen.append(os.listdir(folder / "out"))
        real_fsync(fd)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "fsync", fsync_and_look)
    try:
        _conn.Producer(serializer="json").publish({"n": 1}, routing_key="acme")
    finally:
        mp.undo()
    assert seen == [[]]
    (name,) = os.listdir(folder / "out")
    assert embedded_broker.decode_message((folder / "out" / name).read_bytes())


def _plant(folder: Path, order: int, content: bytes, queue: str = "acme") -> str:
    name = f"{order:020d}_{order:032x}.{queue}.msg"
    (folder / "out" / name).write_bytes(content)
    return name


CORRUPT = {
    "empty": b"",
    "truncated json": b'{"body": "' + MARKER.encode(),
    "json array": json.dumps([MARKER]).encode(),
    "no delivery tag": json.dumps({"body": MARKER, "properties": {}}).encode(),
    "body not base64": json.dumps({**_envelope(b"{}"), "body": f"!!{MARKER}!!"}).encode(),
    "body not json": json.dumps(_envelope(f"not json {MARKER}".encode())).encode(),
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_decode_message_refuses_without_echoing_content(kind: str) -> None:
    with pytest.raises(embedded_broker.UndecodableMessage) as info:
        embedded_broker.decode_message(CORRUPT[kind])
    assert MARKER not in str(info.value)


def test_decode_message_accepts_kombus_envelope() -> None:
    assert embedded_broker.decode_message(json.dumps(_envelope(b'{"a": 1}')).encode())["properties"]


def test_undecodable_messages_are_quarantined_once_and_the_next_one_delivered(
    broker: tuple[Connection, Path, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    conn, folder, settings = broker
    planted = [_plant(folder, n + 1, CORRUPT[k]) for n, k in enumerate(sorted(CORRUPT))]
    conn.Producer(serializer="json").publish({"after": "corrupt"}, routing_key="acme")
    with caplog.at_level(logging.INFO, logger="certqueue.embedded_broker"):
        assert _drain(conn, "acme", 1) == [{"after": "corrupt"}]
    assert sorted(os.listdir(folder / "quarantine")) == sorted(planted)
    assert os.listdir(folder / "out") == [] and os.listdir(folder / "claimed") == []
    lines = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == len(planted)
    for name in planted:
        assert sum(name in line for line in lines) == 1
    assert MARKER not in caplog.text
    assert embedded_broker.quarantined(settings) == {"acme": len(planted)}


def test_quarantine_metric(broker: tuple[Connection, Path, Settings]) -> None:
    from certqueue import metrics

    _conn, folder, settings = broker
    (folder / "quarantine" / "00000000000000000001_ab.dns.msg").write_bytes(b"")
    (folder / "quarantine" / "README").write_text("not a message")
    fams = {f.name: f for f in metrics.broker_families(settings)}
    samples = {s.labels["queue"]: s.value for s in fams["certqueue_broker_quarantined"].samples}
    assert samples["dns"] == 1 and samples["acme"] == 0 and samples["scan"] == 0


def test_two_consumers_never_get_the_same_message(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "broker")
    url, _backend, opts = broker_urls(settings)
    with Connection(url, transport_options=opts) as a, Connection(url, transport_options=opts) as b:
        producer = a.Producer(serializer="json")
        for i in range(40):
            producer.publish({"n": i}, routing_key="dns")
        ca, cb = a.default_channel, b.default_channel
        got: list[int] = []
        for _ in range(60):
            for ch in (ca, cb):
                msg = ch.basic_get("dns", no_ack=True)
                if msg is not None:
                    got.append(json.loads(msg.body)["n"])
    assert sorted(got) == list(range(40))


def test_orphaned_claims_are_put_back(broker: tuple[Connection, Path, Settings], monkeypatch: Any) -> None:
    """A consumer killed between claiming and reading leaves its message in claimed/: it returns."""
    conn, folder, _ = broker
    name = _plant(folder, 1, json.dumps(_envelope(b'{"orphan": true}')).encode())
    os.rename(folder / "out" / name, folder / "claimed" / name)
    monkeypatch.setattr(embedded_broker, "ORPHAN_SECONDS", 0.0)
    msg = conn.default_channel.basic_get("acme", no_ack=True)
    assert msg is not None and json.loads(msg.body) == {"orphan": True}
    assert os.listdir(folder / "claimed") == []


def test_fanout_tables_are_rewritten_whole(broker: tuple[Connection, Path, Settings]) -> None:
    conn, folder, _ = broker
    exchange = Exchange("cq.fanout", type="fanout")
    queues = [Queue(f"fan{i}", exchange=exchange) for i in range(3)]
    for q in queues:
        q(conn.default_channel).declare()
    table = json.loads((folder / "control" / "cq.fanout.exchange").read_text())
    assert sorted(row[2] for row in table) == ["fan0", "fan1", "fan2"]
    conn.Producer(serializer="json").publish({"all": 1}, exchange=exchange)
    for q in queues:
        msg = conn.default_channel.basic_get(q.name, no_ack=True)
        assert msg is not None and json.loads(msg.body) == {"all": 1}
    queues[1](conn.default_channel).delete()
    table = json.loads((folder / "control" / "cq.fanout.exchange").read_text())
    assert sorted(row[2] for row in table) == ["fan0", "fan2"]
    assert [n for n in os.listdir(folder / "control") if n.startswith(".") and n != ".lock"] == []


def test_queue_depths_count_ready_and_claimed(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "broker")
    broker_urls(settings)
    folder = tmp_path / "broker"
    _plant(folder, 1, b"{}")
    _plant(folder, 2, b"{}", queue="propagate.eu-west")
    (folder / "claimed" / "00000000000000000003_c.acme.msg").write_bytes(b"{}")
    (folder / "out" / "stray.tmp").write_bytes(b"")
    depths = embedded_broker.queue_depths(settings, ["acme", "dns", "propagate.eu-west"])
    assert depths == {"acme": 2, "dns": 0, "propagate.eu-west": 1}
