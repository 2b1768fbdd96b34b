"""Entry point of the dns worker pool (`certqueue worker --pool dns`)."""

import sys

from certqueue.cli import main

if __name__ == "__main__":
    main(["worker", "--pool", "dns", *sys.argv[1:]])
