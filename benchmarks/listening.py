"""The listening sockets of a run: every process under ``fedsim run``.

Usage::

    python benchmarks/listening.py [fedsim run arguments ...]

Runs ``fedsim run`` with the given arguments (e.g. ``--set rounds=2 --set
federation.clients=2 --set model.name=mlp --out /tmp/runs``), looks every 0.3 s
at the processes under it and prints, once it ended, each address and port one
of them listened on (TCP) with the process's name: the README's table of a
local run's sockets ("Ray cluster").
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def main() -> None:
    argv = [sys.executable, "-m", "fedsim", "run", *sys.argv[1:]]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    seen: dict[int, psutil.Process] = {}
    sockets: dict[tuple[str, int], str] = {}
    while proc.poll() is None:
        try:
            seen.update((p.pid, p) for p in psutil.Process(proc.pid).children(True))
        except psutil.NoSuchProcess:
            break
        for pid, p in list(seen.items()):
            try:
                for conn in p.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        sockets[(conn.laddr.ip, conn.laddr.port)] = p.name()
            except psutil.Error:
                seen.pop(pid)
        time.sleep(0.3)
    print(f"fedsim run exited with {proc.returncode}")
    for (ip, port), name in sorted(sockets.items(), key=lambda kv: kv[1]):
        print(f"{ip:>18} {port:<6} {name}")


if __name__ == "__main__":
    main()
