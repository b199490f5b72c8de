"""Ray job entry point: `python jobs/train.py --help` (same options as `lungseg train`)."""

import sys

from lungseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
