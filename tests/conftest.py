"""Fixture plugins: each module owns the servers of one area."""

import importlib.util

pytest_plugins = [
    name
    for name in (
        "tests.conftest_db",
        "tests.conftest_pebble",
        "tests.conftest_dns",
        "tests.conftest_targets",
        "tests.conftest_stack",
    )
    if importlib.util.find_spec(name) is not None
]
