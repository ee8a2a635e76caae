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
  time first), which shortens the round's tail on a few actors;
- ``RayBackend.build`` and ``terminate`` (:func:`pipeline`): each actor holds
  two messages at once, one running and one queued in Ray, so it starts the
  next client as soon as one ends instead of idling while the reply travels
  back and the next message travels out (1.8 ms a message here). With 1,000
  clients x 100 a round the actors were idle 41% of the time; pipelining
  took the round from 0.62 to 0.54 s. An actor still runs one client at a
  time, so an actor's memory (and a GPU share) is unchanged.

Nothing is replaced on another Flower version than 1.41 (the launcher then
runs Flower's runtime unchanged), nor in a SuperLink fedsim did not start.

The launcher also sets one Ray default before Ray starts (:func:`ray_defaults`):
messages and replies up to 1 MiB travel inside Ray's task calls instead of
through its shared-memory object store (Ray's threshold is 100 KiB). A message
is read once, by one actor on the same machine, so the store's set-up per
object (create, seal, pin, release through the raylet) is pure cost: with the
quickstart's 154 KB CNN it took 17% of a round (0.43 -> 0.36 s) and 0.16 of
the 2 cores in Ray's daemons. Above about 1 MiB the copies of an inlined
object cost as much as the store. A value the user set in the environment
(``RAY_max_direct_call_object_size``) wins.
"""

from __future__ import annotations

import os
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
#: Messages each Ray actor holds at once (one running, the others queued).
TASKS_PER_ACTOR = 2
#: Ray's largest object passed inside a task call (bytes), see module doc.
INLINE_BYTES = 2**20
#: Ray reads its system settings from ``RAY_<name>`` variables in every process
#: it starts (they inherit the simulation process's environment).
INLINE_VARIABLE = "RAY_max_direct_call_object_size"
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


def ray_defaults() -> None:
    """Ray's settings for a simulation on one machine (see module doc); call
    before Ray starts. Settings the environment already has are kept."""
    os.environ.setdefault(INLINE_VARIABLE, str(INLINE_BYTES))


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
    _pipeline_ray_backend()
    return True


def pipeline(pool: Any, tasks: int = TASKS_PER_ACTOR) -> None:
    """List every actor of Flower's ``BasicActorPool`` ``tasks`` times: the
    pool hands an actor to each message it submits and takes it back with the
    reply, and the runtime runs one worker thread per listed actor, so each
    actor gets up to ``tasks`` messages at once (Ray runs an actor's calls one
    after another, in order)."""
    actors = list(dict.fromkeys(pool.pool))
    pool.pool = actors * tasks
    pool.num_actors = len(pool.pool)


def _pipeline_ray_backend() -> None:
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    if getattr(RayBackend.build, "pipelined", False):
        return
    build, terminate = RayBackend.build, RayBackend.terminate

    def pipelined_build(self: Any, app_fn: Any) -> None:
        build(self, app_fn)
        pipeline(self.pool)

    def terminate_once(self: Any) -> None:
        if self.pool:  # each actor once, however often it is listed
            pipeline(self.pool, tasks=1)
        terminate(self)

    pipelined_build.pipelined = True  # type: ignore[attr-defined]
    RayBackend.build = pipelined_build
    RayBackend.terminate = terminate_once


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
    """The launcher's entry: Flower's ``flwr-simulation`` after
    :func:`ray_defaults` and :func:`install`."""
    ray_defaults()
    install()
    from flwr.simulation.app import flwr_simulation

    flwr_simulation()
