"""Nothing fedsim starts outlives it, however it dies (``kill -9`` included).

fedsim starts a SuperLink, which starts a SuperExec, which starts the simulation
process, which starts Ray (a GCS server, a raylet, workers, actors). The runner
stops that tree when a run ends or is interrupted; this module covers the case
where the ``fedsim`` process cannot do it (SIGKILL, a crash, the OOM killer, a
notebook kernel restarted).

Two layers:

- :func:`die_with_parent`: on Linux, the SuperLink and ``flwr run`` get
  ``PR_SET_PDEATHSIG`` = SIGTERM, so the kernel stops them when fedsim dies. The
  SuperExec follows by itself (Flower starts it with ``--parent-pid``), but the
  simulation process and Ray do not: they are re-parented and train on.
- :class:`Lifeline`: a small watchdog process (``python -m
  fedsim.engine.host.lifeline``) started first, in its own session so that Ctrl-C in
  the terminal does not reach it. fedsim tells it the PIDs of the processes it
  starts over a pipe; the watchdog keeps following their descendants (every
  :data:`TICK` seconds, remembering those re-parented since), and when the pipe
  closes (fedsim ended, however: the kernel closes a dead process's files) it
  terminates every one still alive, kills those left after :data:`GRACE`
  seconds, deletes the folders it was told to (:meth:`Lifeline.remove`: the
  SuperLink's private ``FLWR_HOME``), and exits. After a normal end the runner
  has stopped them already and the watchdog just exits.

:func:`stop_signals` makes SIGINT/SIGTERM stop a run once: later ones, while
the runner stops everything and finalises the summary, are ignored.

A ``psutil.Process`` remembers its start time, so a reused PID is never
signalled.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType, TracebackType

import psutil

#: Seconds between two looks at the watched processes' descendants.
TICK = 0.5
#: Seconds a process gets to exit after SIGTERM before it is killed.
GRACE = 3.0

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process
    dies (Linux ``prctl(PR_SET_PDEATHSIG)``); None elsewhere.

    The child exits at once if this process died before the call took effect.
    The signal follows the *thread* that starts the child: start it from a
    thread that outlives it (the runner's does: it waits for the child).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


class Lifeline:
    """The watchdog process and the write end of its pipe.

    Use as a context manager around everything a run starts; :meth:`watch`
    each process started. Leaving the block closes the pipe and waits for the
    watchdog to finish.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedsim.engine.host.lifeline"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # armed before anything is started: wait for the watchdog's first line
        assert self.process.stdout is not None
        self.process.stdout.readline()
        self.process.stdout.close()

    def watch(self, pid: int) -> None:
        """Stop ``pid`` and all its descendants if this process dies."""
        self._send(f"{pid}\n")

    def remove(self, folder: Path) -> None:
        """Delete ``folder`` (absolute) once the watched processes are stopped,
        whether this process ends normally or dies."""
        self._send(f"{folder.resolve()}\n")

    def _send(self, line: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        with suppress(OSError):
            stdin.write(line.encode())
            stdin.flush()

    def close(self, timeout: float = 2 * GRACE + 5) -> None:
        """Close the pipe and wait for the watchdog (it stops any survivor)."""
        if self.process.stdin is not None:
            with suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Lifeline:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


class StopSignals:
    """SIGINT and SIGTERM stop a run once.

    The first raises ``KeyboardInterrupt`` in the main thread (the runner then
    stops what it started and finalises the summary); any later one, and any
    once the shutdown has begun (:meth:`stop`), is ignored with a note on
    stderr, so that an impatient second Ctrl-C never cuts the cleanup short or
    leaves ``summary.json`` saying ``running``.
    """

    def __init__(self) -> None:
        self.stopping = False

    def stop(self) -> None:
        """The shutdown has begun: ignore further signals."""
        self.stopping = True

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            # os.write, not print: a handler may run in the middle of a print
            os.write(2, b"fedsim: stopping the run; please wait\n")
            return
        self.stopping = True
        raise KeyboardInterrupt


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Install :class:`StopSignals` for SIGINT and SIGTERM (main thread only:
    elsewhere Python allows no handlers, and the caller's stay)."""
    signals = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, signals.handler) for sig in wanted}
    try:
        yield signals
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the watchdog process ------------------------------------------------------


def _ppid_map() -> dict[int, int]:
    """PID -> parent PID of every process: on Linux straight from ``/proc/*/stat``
    (a few ms, cheap enough to repeat every tick), elsewhere through psutil."""
    if not os.path.isdir("/proc/self"):
        return {p.pid: p.info["ppid"] for p in psutil.process_iter(["ppid"])}
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        out[int(name)] = int(stat[stat.rfind(b")") + 2 :].split()[1])
    return out


def _descendants(
    tracked: dict[tuple[int, float], psutil.Process],
) -> list[psutil.Process]:
    """Live processes whose parent is tracked (one pass over the process table)."""
    by_parent: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        by_parent.setdefault(ppid, []).append(pid)
    found: list[psutil.Process] = []
    todo = [p.pid for p in tracked.values() if p.is_running()]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            with suppress(psutil.Error):
                found.append(psutil.Process(child))
            todo.append(child)
    return found


def _track(
    tracked: dict[tuple[int, float], psutil.Process], procs: Iterable[psutil.Process]
) -> None:
    for proc in procs:
        with suppress(psutil.Error):
            tracked.setdefault((proc.pid, proc.create_time()), proc)


def _alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        with suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def stop_all(tracked: dict[tuple[int, float], psutil.Process]) -> None:
    """Terminate every tracked process and their descendants; kill what is left
    after :data:`GRACE` seconds (again for children born meanwhile)."""
    _track(tracked, _descendants(tracked))
    alive = _alive(tracked.values())
    for proc in alive:
        with suppress(psutil.Error):
            proc.terminate()
    psutil.wait_procs(alive, timeout=GRACE)
    for _ in range(3):
        _track(tracked, _descendants(tracked))
        alive = _alive(tracked.values())
        if not alive:
            return
        for proc in alive:
            with suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=2)


def watchdog(fd: int) -> None:
    """Follow the PIDs written to ``fd`` (one per line) and their descendants;
    at end of file, stop every one still alive, then delete the folders
    written to ``fd`` (lines starting with ``/``)."""
    tracked: dict[tuple[int, float], psutil.Process] = {}
    folders: list[str] = []
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], TICK)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"/"):
                    folders.append(os.fsdecode(line))
                    continue
                with suppress(ValueError, psutil.Error):
                    _track(tracked, [psutil.Process(int(line))])
        _track(tracked, _descendants(tracked))
    stop_all(tracked)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    """Entry point of ``python -m fedsim.engine.host.lifeline`` (stdin: the pipe)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # only the pipe's end stops the watch
    print("ready", flush=True)
    sys.stdout.close()
    watchdog(sys.stdin.fileno())


if __name__ == "__main__":
    main()
