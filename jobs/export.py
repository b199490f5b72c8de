"""Ray job entry point: `python jobs/export.py --help` (same options as `lungseg export`)."""

import sys

from lungseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
