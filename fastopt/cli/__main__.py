"""``python -m fastopt.cli``: the ``fastopt`` command line."""

import sys

from . import main

sys.exit(main())
