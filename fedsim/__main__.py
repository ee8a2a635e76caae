"""``python -m fedsim``: the ``fedsim`` command line."""

import sys

from fedsim.engine.cli import main

sys.exit(main())
