"""Local stand-ins for the outside world, for the demo, the tests and the benchmarks.

Everything here listens on loopback only and is started and stopped by certqueue's own code:
Pebble and pebble-challtestsrv (``pebble``), BIND9 (``bind``), moto (``moto``), TLS material for
fake HTTPS servers (``tls``). Nothing here is used by a production deployment.

A top-level package of the checkout, outside ``certqueue`` (issue 16): the wheel does not ship it.
It is importable wherever the checkout's root is on ``sys.path``: pytest (``pythonpath = ["."]``),
``python -m bench`` and ``python -m certqueue demo`` run from the root (``make demo``). The
processes it starts run ``python -m certqueue``, which needs nothing from here.
"""
