"""The ``flwr-simulation`` process of fedsim's SuperLinks: Flower's runtime,
fedsim's patches and Ray settings made before it starts.

A SuperLink in simulation mode runs each run in a ``flwr-simulation`` process
(the ServerApp in one thread, Flower's Virtual Client Engine in others).
fedsim's SuperLinks find :func:`write_launcher`'s ``flwr-simulation`` first on
their ``PATH``; it runs :func:`main`: :func:`ray_defaults`, fedsim's
``ray.init`` arguments (:func:`init_args`), the simulation runtime's patches
(:func:`fedsim.flwr_private.vce.install`, with the client-state relay and the
placement tag around each client's run), then Flower's own entry point.

Ray default (:func:`ray_defaults`): messages and replies up to 1 MiB travel
inside Ray's task calls instead of through its shared-memory object store
(Ray's threshold is 100 KiB). A message is read once, by one actor on the same
machine, so the store's set-up per object (create, seal, pin, release through
the raylet) is pure cost: with the quickstart's 154 KB CNN it took 17% of a
round (0.43 -> 0.36 s) and 0.16 of the 2 cores in Ray's daemons. Above about
1 MiB the copies of an inlined object cost as much as the store. A value the
user set in the environment (``RAY_max_direct_call_object_size``) wins.

``ray.init`` arguments (:func:`init_args`, see :mod:`fedsim.engine.host.cluster`):
``address="local"`` without a cluster (never attaching to one by accident), the
cluster's address with one.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsim.engine.client import client_state
from fedsim.engine.server import placement
from fedsim.flwr_private import ray_backend, vce

#: Set on the private SuperLink (and so the simulation process) of a run that
#: attaches to a cluster: its ``HOST:PORT``.
ADDRESS_VARIABLE = "FEDSIM_RAY_ADDRESS"
#: Ray's switch of multi-node mode ("0": a node addressed at 127.0.0.1).
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Ray's largest object passed inside a task call (bytes), see module doc.
INLINE_BYTES = 2**20
#: Ray reads its system settings from ``RAY_<name>`` variables in every process
#: it starts (they inherit the simulation process's environment).
INLINE_VARIABLE = "RAY_max_direct_call_object_size"
#: The launcher's file name: the command Flower's SuperExec starts.
COMMAND = "flwr-simulation"
#: What fedsim does around each client's run in this process.
RELAY = vce.Relay(
    before=client_state.relay_before, after=client_state.relay_after, tag=placement.tag
)


def ray_defaults() -> None:
    """Ray's settings for a simulation on one machine (see module doc); call
    before Ray starts. Settings the environment already has are kept."""
    os.environ.setdefault(INLINE_VARIABLE, str(INLINE_BYTES))


def init_args(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """fedsim's ``ray.init`` arguments for the simulation process (see
    :mod:`fedsim.engine.host.cluster`)."""
    address = env.get(ADDRESS_VARIABLE, "")
    if address:
        return {"address": address}
    return {"address": "local", "include_dashboard": False}


def install() -> bool:
    """fedsim's ``ray.init`` arguments and the runtime's patches (False where
    the patches were skipped on another Flower version)."""
    ray_backend.add_init_args(init_args)
    return vce.install(RELAY)


def write_launcher(folder: Path) -> Path:
    """``folder/flwr-simulation``: this interpreter, then :func:`main`. Put
    ``folder`` first on the SuperLink's ``PATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / COMMAND
    # pip's trampoline: the shell runs this file again with the interpreter
    # (a shebang line breaks on a path with spaces), for which the first lines
    # are a string
    launcher.write_text(
        "#!/bin/sh\n"
        f'\'\'\'exec\' "{sys.executable}" "$0" "$@"\n'
        "' '''\n"
        f"from {__name__} import main\n"
        "\n"
        "main()\n",
        "utf-8",
    )
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP)
    return launcher


def main() -> None:
    """The launcher's entry: Flower's ``flwr-simulation`` after
    :func:`ray_defaults` and :func:`install`."""
    ray_defaults()
    install()
    vce.run_flower_simulation()
