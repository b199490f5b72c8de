"""Ray job entry point: `python jobs/segment.py --help` (same options as `lungseg segment`)."""

import sys

from lungseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
