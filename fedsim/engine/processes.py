"""Processes: stopping process trees (what fedsim starts, a SuperLink, its
SuperExec, the simulation and Ray, ``flwr run``, is stopped with every
descendant, and a PID that was reused meanwhile is never signalled) and free
loopback ports for them."""

from __future__ import annotations

import socket
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


def stop_processes(procs: Iterable[psutil.Process], timeout: float = 15.0) -> None:
    """Terminate ``procs``; kill (with their children) those still alive after
    ``timeout``. Each ``psutil.Process`` remembers its start time, so a reused
    PID is never signalled."""
    procs = [p for p in procs if p.is_running()]
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            stragglers = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in stragglers:
            with suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(stragglers, timeout=5)
