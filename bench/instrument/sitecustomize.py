"""Benchmark instrumentation, loaded only in processes started with ``bench/instrument`` on
``PYTHONPATH`` and ``BENCH_INSTRUMENT_DIR`` set (certqueue's workers in a benchmark run).

Counts, per Celery task name, SQL statements and their time (SQLAlchemy engine events) and HTTP
requests and their time (``requests.Session.send``: the ACME calls), and writes them as JSON to
``$BENCH_INSTRUMENT_DIR/<pid>.json`` after tasks (at most every 0.5 s) and at process
shutdown. Records counts and durations only: never statements' parameters, URLs or bodies.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("BENCH_INSTRUMENT_DIR")

if _DIR:
    import atexit
    import json
    import threading
    import time

    _lock = threading.Lock()
    _stats: dict[str, dict[str, float]] = {}
    _last_dump = [0.0]

    #: the task this process runs now (a prefork child runs one at a time): Celery's current_task
    #: is per thread, so the statements of a batch's worker threads are counted under their task
    _running: list[str] = ["-"]

    def _task_name() -> str:
        try:
            from celery import current_task

            t = current_task
            return str(t.name) if t is not None and getattr(t, "name", None) else _running[0]
        except Exception:
            return _running[0]

    def _add(key: str, dt: float) -> None:
        name = _task_name()
        with _lock:
            s = _stats.setdefault(name, {})
            s[key + "_n"] = s.get(key + "_n", 0) + 1
            s[key + "_s"] = s.get(key + "_s", 0.0) + dt

    def _dump(force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - _last_dump[0] < 0.5:
            return
        _last_dump[0] = now
        with _lock:
            data = json.dumps(_stats)
        path = os.path.join(str(_DIR), f"{os.getpid()}.json")
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            pass

    import re

    _SHAPES = os.environ.get("BENCH_SQL_SHAPES", "") not in ("", "0")
    _SHAPE_RE = re.compile(r"^\s*(UPDATE|\w+\b.*?\b(?:FROM|INTO))\s+\"?(\w+)", re.I | re.S)

    def _shape(statement: str) -> str:
        """``SELECT certificates``, ``UPDATE orders``, ``INSERT events``: the verb and the first
        table named, never a value (statements carry parameters as placeholders)."""
        m = _SHAPE_RE.match(statement)
        if m is None:
            return statement.split(None, 1)[0].upper() if statement.strip() else "?"
        verb, table = m.group(1).split(None, 1)[0].upper(), m.group(2)
        return f"{verb} {table}"

    _SITES = os.environ.get("BENCH_SQL_SITES", "") not in ("", "0")

    def _site() -> str:
        """The certqueue code that issued a statement: its innermost certqueue frames (file:line
        function), outside the session helpers; costly, so only with BENCH_SQL_SITES=1."""
        import sys

        f = sys._getframe(2)
        out: list[str] = []
        while f is not None and len(out) < 3:
            path = f.f_code.co_filename
            if "/certqueue/" in path and "/certqueue/db.py" not in path:
                out.append(f"{path.rsplit('/certqueue/', 1)[1]}:{f.f_lineno} {f.f_code.co_name}")
            f = f.f_back
        return " < ".join(out) or "?"

    def _install_sqlalchemy() -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        def before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            conn.info.setdefault("_bench_t0", []).append(time.perf_counter())

        def after(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            stack = conn.info.get("_bench_t0")
            if stack:
                dt = time.perf_counter() - stack.pop()
                _add("sql", dt)
                if _SHAPES:
                    _add("shape:" + _shape(statement), dt)
                if _SITES:
                    _add("site:" + _shape(statement) + " @ " + _site(), dt)

        event.listen(Engine, "before_cursor_execute", before)
        event.listen(Engine, "after_cursor_execute", after)

        def commit(conn):  # type: ignore[no-untyped-def]
            _add("commit", 0.0)

        event.listen(Engine, "commit", commit)

    def _install_requests() -> None:
        import requests

        orig = requests.Session.send

        def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return orig(self, request, **kwargs)
            finally:
                _add("http", time.perf_counter() - t0)

        requests.Session.send = send  # type: ignore[method-assign]

    def _install_celery() -> None:
        from celery import signals

        def prerun(task=None, **_kw):  # type: ignore[no-untyped-def]
            _running[0] = str(getattr(task, "name", None) or "-")

        def postrun(**_kw):  # type: ignore[no-untyped-def]
            _add("task", 0.0)
            _running[0] = "-"
            _dump()

        def shutdown(**_kw):  # type: ignore[no-untyped-def]
            _dump(force=True)

        signals.task_prerun.connect(prerun, weak=False)
        signals.task_postrun.connect(postrun, weak=False)
        signals.worker_process_shutdown.connect(shutdown, weak=False)

    def _install_yappi() -> None:
        """With BENCH_YAPPI=1: a CPU-time profile (yappi, every thread) of each pool process, from
        its start to its exit, saved as ``yappi-<pid>.pstat`` beside the counters."""
        if os.environ.get("BENCH_YAPPI", "") in ("", "0"):
            return
        import yappi  # type: ignore[import-not-found]
        from celery import signals

        def start(**_kw):  # type: ignore[no-untyped-def]
            yappi.set_clock_type("cpu")
            yappi.start(builtins=False, profile_threads=True)

        def stop(**_kw):  # type: ignore[no-untyped-def]
            yappi.stop()
            path = os.path.join(str(_DIR), f"yappi-{os.getpid()}.pstat")
            yappi.get_func_stats().save(path, type="pstat")

        signals.worker_process_init.connect(start, weak=False)
        signals.worker_process_shutdown.connect(stop, weak=False)

    try:
        _install_sqlalchemy()
        _install_requests()
        _install_celery()
    except Exception:  # instrumentation must never stop a worker
        pass
    try:
        _install_yappi()  # on its own: a missing yappi must not take the counters with it
    except Exception:
        pass
    atexit.register(_dump, True)
