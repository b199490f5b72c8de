"""Ray job entry point: `python jobs/clean.py --help` (same options as `lungseg clean`)."""

import sys

from lungseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["clean", *sys.argv[1:]]))
