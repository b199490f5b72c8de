"""Job entry point: `python jobs/report.py --help` (same options as `lungseg report`)."""

import sys

from lungseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
