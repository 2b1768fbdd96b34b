"""Entry point of the acme worker pool (`certqueue worker --pool acme`)."""

import sys

from certqueue.cli import main

if __name__ == "__main__":
    main(["worker", "--pool", "acme", *sys.argv[1:]])
