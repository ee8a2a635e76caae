"""Processes: stopping process trees (what fedsim starts, a SuperLink, its
SuperExec, the simulation and Ray, ``flwr run``, is stopped with every
descendant, and a PID that was reused meanwhile is never signalled) and free
loopback ports for them."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from contextlib import suppress

import psutil


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[psutil.Process]:
    """The live descendants of ``pid`` (empty if it is gone)."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, timeout: float = 15.0) -> None:
    """Terminate a process and all its descendants (collected first), then kill."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    stop_processes(procs, timeout)


def living(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running; a zombie (exited, not yet reaped: its
    parent is gone and PID 1 of a container may never reap it) counts as gone."""
    out = []
    for proc in procs:
        with suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def _wait(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` seconds for ``procs`` to end; the survivors."""
    deadline = time.monotonic() + timeout
    while (alive := living(procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def stop_processes(procs: Iterable[psutil.Process], timeout: float = 15.0) -> None:
    """Terminate ``procs``; kill (with their children) those still alive after
    ``timeout``. Each ``psutil.Process`` remembers its start time, so a reused
    PID is never signalled."""
    procs = living(procs)
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.terminate()
    for proc in _wait(procs, timeout):
        try:
            stragglers = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in stragglers:
            with suppress(psutil.NoSuchProcess):
                p.kill()
        _wait(stragglers, 5)
