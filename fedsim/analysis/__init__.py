"""Reading and comparing run directories (see :mod:`fedsim.analysis.runs`)."""

from fedsim.analysis.runs import *  # noqa: F403
