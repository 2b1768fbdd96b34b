"""Local stand-ins for the outside world, for the demo, the tests and the benchmarks.

Everything here listens on loopback only and is started and stopped by certqueue's own code:
Pebble and pebble-challtestsrv (``pebble``), BIND9 (``bind``), moto (``moto``), TLS material for
fake HTTPS servers (``tls``). Nothing here is used by a production deployment.
"""
