"""``python -m fedsim``: the ``fedsim`` command line."""

import sys

from fedsim.engine.host.cli import main

sys.exit(main())
