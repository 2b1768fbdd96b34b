"""Entry point of the propagate worker pool (`certqueue worker --pool propagate`)."""

import sys

from certqueue.cli import main

if __name__ == "__main__":
    main(["worker", "--pool", "propagate", *sys.argv[1:]])
