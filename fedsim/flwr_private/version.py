"""Which Flower the patches of this package were written against, and the
warning a skipped patch gives.

Every patch here replaces private code of Flower 1.41 (see
:mod:`fedsim.flwr_private`). On another Flower version the code it replaces
may have changed shape, so the patch is not made: the run still works, on
Flower's own code, without the speed-up. :func:`patchable` says so once per
patch and process with an :class:`UnsupportedFlowerWarning` naming what is lost,
instead of dropping the speed-up without a word.
"""

from __future__ import annotations

import threading
import warnings

import flwr

#: The Flower release line the patches were written against.
SUPPORTED = "1.41."
_warned: set[str] = set()
_lock = threading.Lock()


class UnsupportedFlowerWarning(UserWarning):
    """A patch of Flower's private code was skipped on another Flower version."""


def installed() -> str:
    """The installed Flower's version."""
    return str(flwr.__version__)


def supported(version: str | None = None) -> bool:
    """Whether the patches were written for ``version`` (the installed Flower's
    by default)."""
    return (version or installed()).startswith(SUPPORTED)


def patchable(patch: str, loses: str) -> bool:
    """True on the supported Flower; otherwise warn once (per ``patch`` and
    process) that ``patch`` is skipped and the run ``loses`` what it gave, and
    return False."""
    if supported():
        return True
    with _lock:
        first = patch not in _warned
        _warned.add(patch)
    if first:
        warnings.warn(
            f"fedsim: Flower {installed()} is not the {SUPPORTED}x the patch "
            f"{patch!r} was written for; skipped (the run {loses})",
            UnsupportedFlowerWarning,
            stacklevel=3,
        )
    return False
