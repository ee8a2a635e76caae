"""A run or sweep directory belongs to one process at a time.

The process that runs in a directory (``fedsim run``, ``fedsim run --resume``,
``fedsim sweep``) holds ``<dir>/.lock`` for as long as it runs: the file names
its owner (PID, host, what it does) and the process holds an exclusive
``flock`` on it. Another process that wants the directory is refused with one
line naming the owner (:class:`fedsim.core.errors.ConfigError`, exit 2, nothing
written). The operating system drops the ``flock`` when its process dies, so a
lock file left by a killed process is stale: the next owner sees that no one
holds it and takes it over. Where ``flock`` is not available (some network file
systems), the PID and host decide: a lock of this host whose process is gone
is stale; one of another host is respected.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from fedsim.core.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

#: The lock file of a run or sweep directory.
LOCK_FILE = ".lock"


def owner_of(directory: Path) -> dict[str, Any] | None:
    """What the directory's lock file says of its owner (None: no lock file or
    an unreadable one)."""
    try:
        owner = json.loads((directory / LOCK_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _process_gone(owner: dict[str, Any]) -> bool:
    """Whether the owner named in a lock file is a process of this host that no
    longer runs."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError, OverflowError):
        return False
    return False


def _refusal(directory: Path, owner: dict[str, Any] | None) -> ConfigError:
    who = "another process"
    if owner:
        what = owner.get("purpose", "fedsim")
        who = f"{what} (process {owner.get('pid')} on {owner.get('host')})"
    return ConfigError(
        f"{directory} is in use by {who}; wait until it ends, or remove "
        f"{directory / LOCK_FILE} if that process is gone"
    )


def check_free(directory: Path) -> None:
    """Refuse (ConfigError) when a live process holds ``directory``; writes
    nothing (a directory without a lock file, or with a stale one, is free)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return
    try:
        if fcntl is None:
            owner = owner_of(directory)
            if owner and not _process_gone(owner):
                raise _refusal(directory, owner)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise _refusal(directory, owner_of(directory)) from None
            owner = owner_of(directory)
            if owner and not _process_gone(owner):
                raise _refusal(directory, owner) from None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def locked(directory: Path, purpose: str) -> Iterator[None]:
    """Hold ``directory``'s lock while the block runs (``purpose``: shown to a
    process that is refused, e.g. ``"fedsim run"``).

    Raises
    ------
    ConfigError
        Another live process holds the directory.
    """
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise _refusal(directory, owner_of(directory)) from None
                # no flock here: the PID and host decide
                owner = owner_of(directory)
                if owner and not _process_gone(owner):
                    raise _refusal(directory, owner) from None
        with suppress(OSError):  # the owner we waited on removed the file
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise _refusal(directory, owner_of(directory))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            if owner_of(directory) == me:
                with suppress(OSError):
                    path.unlink()
    finally:
        os.close(fd)
