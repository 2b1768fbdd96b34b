"""The ``certqueue`` command (``python -m certqueue`` and the installed script).

A command's start is imports and settings: hundreds of thousands of objects that all live until the
process ends. The cyclic garbage collector would walk them again and again during startup and free
nothing (about a sixth of a read command's time). So the entry point pauses it; the CLI resumes it
once its settings are loaded (``certqueue.cli.end_startup``), after freezing what startup made, so
that later collections in a long-running command (a worker, the API) skip those objects too.
"""

import gc


def run() -> None:
    gc.disable()
    from certqueue import cli

    cli.startup_gc_paused = True
    try:
        cli.main()
    finally:
        cli.end_startup()


if __name__ == "__main__":
    run()
