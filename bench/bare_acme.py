"""The bare ``acme`` library at its best: ``python -m bench.bare_acme --threads T --n N ...``.

One account per process, one ``ClientV2`` per thread (they are not thread-safe), ECDSA P-256 keys,
HTTP-01 token files written to a webroot served by :mod:`bench.webroot`, tight polling (``--poll``
seconds) instead of acme's one-second sleeps, badNonce retried. No database, no queue, nothing
durable: the ceiling a pipeline is measured against. Prints one JSON line: per-certificate latencies
and failures.
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import josepy as jose
from acme import challenges, client, crypto_util, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

T = TypeVar("T")
TIMEOUT = 10.0


def _retry(fn: Callable[[], T], attempts: int = 8) -> T:
    for i in range(attempts):
        try:
            return fn()
        except messages.Error as exc:
            if exc.code == "badNonce" and i + 1 < attempts:
                continue
            raise
    raise AssertionError("unreachable")


def _net(
    key: jose.JWK, ca: str, account: messages.RegistrationResource | None = None
) -> client.ClientNetwork:
    return client.ClientNetwork(
        key,
        alg=jose.ES256,
        account=account,
        verify_ssl=ca,  # type: ignore[arg-type]  # requests takes a CA bundle path too
        timeout=TIMEOUT,  # type: ignore[arg-type]
        user_agent="certqueue-bench-bare",
    )


def _client(key: jose.JWK, ca: str, directory: str, account: Any = None) -> client.ClientV2:
    net = _net(key, ca, account)
    d = messages.Directory.from_json(net.get(directory).json())
    return client.ClientV2(d, net)


def _poll_order(
    c: client.ClientV2, orderr: messages.OrderResource, want: set[str], poll: float, deadline: float
) -> messages.Order:
    while time.monotonic() < deadline:
        body = messages.Order.from_json(_retry(lambda: c._post_as_get(orderr.uri)).json())
        if body.status.name in want or body.status == messages.STATUS_INVALID:
            return body
        time.sleep(poll)
    raise TimeoutError("order did not progress")


def issue_one(c: client.ClientV2, name: str, webroot: Path, poll: float, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    csr = crypto_util.make_csr(pem, [name])
    orderr = _retry(lambda: c.new_order(csr))
    files = []
    for authz in orderr.authorizations:
        chall = next(ch for ch in authz.body.challenges if isinstance(ch.chall, challenges.HTTP01))
        response, validation = chall.response_and_validation(c.net.key)
        path = webroot / ".well-known" / "acme-challenge" / chall.chall.encode("token")
        path.write_text(validation)
        files.append(path)
        _retry(lambda: c.answer_challenge(chall, response))  # noqa: B023
    try:
        body = _poll_order(c, orderr, {"ready", "valid"}, poll, deadline)
        if body.status == messages.STATUS_INVALID:
            raise RuntimeError("order invalid")
        if body.status == messages.STATUS_READY:
            orderr = _retry(lambda: c.begin_finalization(orderr))
            body = orderr.body
        if body.status != messages.STATUS_VALID:
            body = _poll_order(c, orderr, {"valid"}, poll, deadline)
        if body.certificate is None:
            raise RuntimeError(f"order {body.status} without certificate")
        chain = _retry(lambda: c._post_as_get(body.certificate)).text
        if "BEGIN CERTIFICATE" not in chain:
            raise RuntimeError("no certificate downloaded")
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--directory", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--webroot", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--prefix", default="bare")
    ap.add_argument("--poll", type=float, default=0.05)
    ap.add_argument("--deadline", type=float, default=60.0)
    ap.add_argument(
        "--barrier",
        default=None,
        help="print 'ready' when the account and every thread's client exist, then wait for this file",
    )
    args = ap.parse_args(argv)
    webroot = Path(args.webroot)
    (webroot / ".well-known" / "acme-challenge").mkdir(parents=True, exist_ok=True)
    account_key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    reg = _client(account_key, args.ca, args.directory)
    account = _retry(
        lambda: reg.new_account(
            messages.NewRegistration.from_data(email="bench@example.test", terms_of_service_agreed=True)
        )
    )
    work: queue.Queue[int] = queue.Queue()
    for i in range(args.n):
        work.put(i)
    lat: list[float] = []
    errors: list[str] = []
    finished: list[float] = []
    lock = threading.Lock()
    go = threading.Event()
    ready = threading.Semaphore(0)

    def worker() -> None:
        c = _client(account_key, args.ca, args.directory, account)
        ready.release()
        go.wait()
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            t0 = time.monotonic()
            try:
                issue_one(c, f"{args.prefix}-{i}.bench.test", webroot, args.poll, args.deadline)
                with lock:
                    lat.append(time.monotonic() - t0)
                    finished.append(time.time())
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for _ in threads:
        ready.acquire()
    if args.barrier:
        print("ready", flush=True)
        barrier = Path(args.barrier)
        while not barrier.exists():
            time.sleep(0.002)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    started = time.time()
    go.set()
    for t in threads:
        t.join(timeout=args.deadline * (args.n / max(args.threads, 1) + 2))
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    json.dump(
        {
            "ok": len(lat),
            "latencies": lat,
            "errors": errors[:20],
            "failed": len(errors),
            "wall": wall,
            "cpu": cpu,
            "started_at": started,
            "finished_at": max(finished) if finished else None,
            "maxrss_mb": ru1.ru_maxrss / 1024,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
