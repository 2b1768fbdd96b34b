"""certqueue's benchmarks: issuance throughput against certbot, lego and the bare ``acme`` library on
one Pebble, where the time goes inside certqueue, a renewal storm, the due-scan at a million rows and
DNS-01 through BIND9.

``python -m bench`` (or ``make bench``) starts every server it needs on loopback, runs the cases,
prints a table and writes ``bench/results/<date>.json``. Nothing here is imported by certqueue.
"""
