"""Entry point of beat (`certqueue beat`); the schedule is certqueue/schedule.py."""

import sys

from certqueue.cli import main

if __name__ == "__main__":
    main(["beat", *sys.argv[1:]])
