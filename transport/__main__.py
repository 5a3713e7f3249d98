"""``python -m transport``: the ``transport`` command, for an environment
whose scripts are not on ``PATH``."""

import sys

from transport.cli import main

sys.exit(main())
