"""Ray job entry point: `python jobs/evaluate.py --help` (same options as `lungseg evaluate`)."""

import sys

from lungseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
