"""``python -m lungseg``: the same as the ``lungseg`` console script."""

import sys

from lungseg.cli import main

sys.exit(main())
