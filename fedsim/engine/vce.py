"""Flower's simulation runtime, started by fedsim: no hand-off waits for a poll.

A SuperLink in simulation mode runs each run in a ``flwr-simulation`` process:
the ServerApp in one thread, Flower's Virtual Client Engine (``vce_api``) in
others. Flower 1.41's engine moves messages between them by polling:

- its pick-up thread asks the LinkState for every node's next message, then
  sleeps 0.1 s (``add_messages_to_queue``): every exchange waited 0-0.1 s
  before its first client started, and a split-learning round of 40 exchanges
  spent 3.6 of its 4.1 s there;
- the ServerApp's grid polls for replies (fedsim's grid waits on the LinkState
  instead, see :meth:`fedsim.engine.recording.RecordingGrid._send_and_wait`).

fedsim's SuperLinks find a ``flwr-simulation`` launcher first on their ``PATH``
(:func:`write_launcher`, in the SuperLink's private ``FLWR_HOME``); it calls
:func:`install` and then Flower's own ``flwr-simulation`` entry point, so the
runtime is Flower's, with these replacements made before it starts:

- the LinkState methods of :mod:`fedsim.engine.linkstate` (indexed pick-up,
  stores that wake their waiters);
- ``vce_api.add_messages_to_queue`` (:func:`add_messages_to_queue`): the same
  loop (every node with a message gets its next one, one per node per sweep,
  the stop event checked at least every 0.1 s) that sweeps again as soon as a
  message is stored instead of after 0.1 s, asks only the nodes that have one,
  and queues them in the order the server pushed them (Flower's loop follows
  node registration order). The actors take queued messages first come first
  served, so the server decides which clients start first: fedsim's grid
  pushes the slowest clients of the previous round first (longest processing
  time first), which shortens the round's tail on a few actors.

Nothing is replaced on another Flower version than 1.41 (the launcher then
runs Flower's runtime unchanged), nor in a SuperLink fedsim did not start.
"""

from __future__ import annotations

import stat
import sys
import threading
from pathlib import Path
from queue import Queue
from typing import Any

from fedsim.engine import linkstate

#: Longest pause between two sweeps (Flower's fixed pause): the stop event is
#: checked at least this often.
SWEEP = 0.1
#: The launcher's file name: the command Flower's SuperExec starts.
COMMAND = "flwr-simulation"


def add_messages_to_queue(
    state: Any,
    queue: Queue[Any],
    nodes_mapping: dict[int, int],
    f_stop: threading.Event,
) -> None:
    """Flower's pick-up loop, woken by every stored message (see module doc)."""
    while not f_stop.is_set():
        stored = linkstate.signals(state).stored
        for node_id in linkstate.pending_nodes(state):
            if node_id in nodes_mapping:
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
        linkstate.wait_for_messages(state, stored, SWEEP)


def install() -> bool:
    """Make the replacements (see module doc); False, and nothing replaced,
    on a Flower version they were not written for."""
    if not linkstate.supported():
        return False
    # the simulation runtime's modules, imported before it starts
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import in_memory_linkstate  # noqa: F401

    linkstate.install()
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True


def write_launcher(folder: Path) -> Path:
    """``folder/flwr-simulation``: this interpreter, :func:`install`, then
    Flower's ``flwr-simulation``. Put ``folder`` first on the SuperLink's
    ``PATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / COMMAND
    # pip's trampoline: the shell runs this file again with the interpreter
    # (a shebang line breaks on a path with spaces), for which the first lines
    # are a string
    launcher.write_text(
        "#!/bin/sh\n"
        f'\'\'\'exec\' "{sys.executable}" "$0" "$@"\n'
        "' '''\n"
        "from fedsim.engine.vce import main\n"
        "\n"
        "main()\n",
        "utf-8",
    )
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP)
    return launcher


def main() -> None:
    """The launcher's entry: Flower's ``flwr-simulation`` after :func:`install`."""
    install()
    from flwr.simulation.app import flwr_simulation

    flwr_simulation()
