"""Ray job entry point: `python jobs/benchmark.py --help` (same options as `lungseg benchmark`)."""

import sys

from lungseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
