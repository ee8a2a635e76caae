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
- ``vce_api.worker`` (:func:`worker`): Flower's worker threads take one queued
  message each and make one Ray call for it; a Ray call costs about 1.1 ms of
  the simulation process's CPU and as much of the actor's, whatever the
  message (measured here with the 1,000-client benchmark's 30 KB messages),
  which with clients of a few milliseconds was a third of the two cores.
  fedsim's workers take an even share of what is queued, at most
  :data:`BATCH` messages, and send them in one call
  (``ClientAppActor.__ray_call__`` runs :func:`run_jobs` in the actor:
  Flower's ``ClientAppActor.run`` on each in turn). Shares shrink with the
  queue (guided self-scheduling), so the round's tail is single messages on
  every actor. Each message still gets its own context, reply and error
  reply: Flower's code for what was raised, the reason quoting the client's
  traceback (Ray's own error quoted it with Ray's header). At 8 a call, the
  1,000-client round went from 1.73-1.75x to 1.52-1.56x the clients'
  compute;
- ``RayBackend.build`` and ``terminate`` (:func:`pipeline`): each actor holds
  two calls at once, one running and one queued in Ray, so it starts the
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
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from logging import ERROR
from pathlib import Path
from queue import Empty, Queue
from typing import Any
from uuid import uuid4

from fedsim.engine import client_state, cluster, linkstate, placement

#: Longest pause between two sweeps (Flower's fixed pause): the stop event is
#: checked at least this often.
SWEEP = 0.1
#: Messages each Ray actor holds at once (one running, the others queued).
TASKS_PER_ACTOR = 2
#: Most messages one Ray call carries (see :func:`batch_size`).
BATCH = 8
#: Seconds of client work one Ray call carries at most (see :func:`batch_size`):
#: a call costs about 2 ms of CPU, 4% of this.
CALL_SECONDS = 0.05
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


def batch_size(queued: int, workers: int, seconds: float | None) -> int:
    """Messages a worker takes into one call when ``queued`` wait (counting
    the one it holds), ``workers`` share them and a message of their type took
    ``seconds`` in an actor (None: not known yet).

    An even share (guided self-scheduling: large calls while the queue is
    long, single messages at the round's tail), at most :data:`BATCH`, and no
    more than fill :data:`CALL_SECONDS`: clients long enough to dwarf a call's
    cost go one a call, which keeps slow clients spread over the actors."""
    if seconds is None:
        return 1
    fill = int(CALL_SECONDS / max(seconds, 1e-6))
    return max(1, min(BATCH, fill, -(-queued // max(workers, 1))))


def worker(
    messageins_queue: Queue[Any],
    messageres_queue: Queue[Any],
    node_info_store: dict[int, Any],
    backend: Any,
    f_stop: threading.Event,
    metrics: Any,
) -> None:
    """Flower's worker thread, taking up to :func:`batch_size` queued messages
    into one Ray call (see module doc)."""
    seconds = message_seconds(backend)
    while not f_stop.is_set():
        try:
            messages = [messageins_queue.get(timeout=1.0)]
        except Empty:
            continue
        take = batch_size(
            messageins_queue.qsize() + 1,
            backend.num_workers,
            seconds.get(messages[0].metadata.message_type),
        )
        while len(messages) < take:
            try:
                messages.append(messageins_queue.get_nowait())
            except Empty:
                break
        started = time.perf_counter()
        try:
            replies = process_messages(backend, node_info_store, messages)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            replies = error_replies(messages, Failed.of(ex))
        metrics.add_clientapp_runtime(time.perf_counter() - started)
        for reply in replies:
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            messageres_queue.put(reply)


def message_seconds(backend: Any) -> dict[str, float]:
    """Seconds an actor took per message of each type, a moving average kept
    on ``backend`` (shared by its workers)."""
    return backend.__dict__.setdefault("fedsim_message_seconds", {})  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Failed:
    """A message whose run raised: Flower's error code and reason for it."""

    code: int
    reason: str

    @classmethod
    def of(cls, ex: BaseException, text: str | None = None) -> Failed:
        """Flower's worker's code and reason for ``ex`` (``text``: what the
        reason quotes, by default ``str(ex)``)."""
        from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
        from flwr.common.constant import ErrorCode

        if isinstance(ex, ClientAppException):
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        elif isinstance(ex, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        else:
            code = ErrorCode.UNKNOWN
        return cls(code, f"{type(ex)}:<'{str(ex) if text is None else text}'>")


def process_messages(
    backend: Any, node_info_store: dict[int, Any], messages: Sequence[Any]
) -> list[Any]:
    """Run ``messages`` in one call to one actor of ``backend`` (a built
    ``RayBackend``); one reply each, in order: the ClientApp's, tagged with
    the Ray node that ran it (:mod:`fedsim.engine.placement`), or an error
    reply as Flower's worker sends one when the run raised. A client's state
    is restored and saved here (:func:`fedsim.engine.client_state.relay_before`),
    whichever node ran it."""
    import ray
    from flwr.common.constant import PARTITION_ID_KEY

    outcomes: list[Any] = []
    jobs = []
    for message in messages:
        try:
            context = node_info_store[message.metadata.dst_node_id].retrieve_context(
                run_id=message.metadata.run_id
            )
            client_state.relay_before(_config(message), context)
            jobs.append((message, str(context.node_config[PARTITION_ID_KEY]), context))
            outcomes.append(None)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            outcomes.append(Failed.of(ex))
    if jobs:
        results: list[Any]
        future, took, node = None, None, ("", "")
        try:
            future = backend.pool.submit(
                lambda actor, app_fn, jobs, *_: actor.__ray_call__.remote(
                    run_jobs, app_fn, jobs
                ),
                (backend.app_fn, jobs, "", None),
            )
            took, node, results = ray.get(future)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            results = [Failed.of(ex)] * len(jobs)
        finally:
            if future is not None:
                backend.pool.add_actor_back_to_pool(future)
        if took is not None:
            seconds = message_seconds(backend)
            kind, each = messages[0].metadata.message_type, took / len(jobs)
            seconds[kind] = (seconds[kind] + each) / 2 if kind in seconds else each
        given = iter(results)
        outcomes = [next(given) if o is None else o for o in outcomes]
    replies = []
    for message, outcome in zip(messages, outcomes, strict=True):
        if isinstance(outcome, Failed):
            replies += error_replies([message], outcome)
            continue
        reply, context = outcome
        node_info_store[message.metadata.dst_node_id].update_context(
            message.metadata.run_id, context=context
        )
        client_state.relay_after(_config(message), context)
        if node[0]:
            placement.tag(reply, *node)
        replies.append(reply)
    return replies


def _config(message: Any) -> Any:
    """A message's ``config`` record (empty if it has none)."""
    from flwr.app import ConfigRecord

    from fedsim.core.messages import CONFIG

    return message.content.config_records.get(CONFIG, ConfigRecord())


def error_replies(messages: Sequence[Any], failed: Failed) -> list[Any]:
    """Flower's error reply to each of ``messages``, logged as Flower logs it."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.supercore import log

    log(ERROR, failed.reason)
    error = Error(code=failed.code, reason=failed.reason)
    return [Message(error, reply_to=message) for message in messages]


def run_jobs(
    actor: Any, app_fn: Any, jobs: list[tuple[Any, str, Any]]
) -> tuple[float, tuple[str, str], list[Any]]:
    """In the actor: Flower's ``ClientAppActor.run`` on each job in turn; the
    seconds they took, the Ray node it runs on (id, address) and, for each
    job, its (reply, context) or :class:`Failed` with the traceback of what it
    raised."""
    import ray

    node = (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())
    started = time.perf_counter()
    outcomes: list[Any] = []
    for message, cid, context in jobs:
        try:
            _, reply, context = actor.run(app_fn, message, cid, context)
            outcomes.append((reply, context))
        except Exception as ex:  # pylint: disable=broad-exception-caught
            outcomes.append(Failed.of(ex, "".join(traceback.format_exception(ex))))
    return time.perf_counter() - started, node, outcomes


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
    vce_api.worker = worker
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
    :func:`ray_defaults`, :func:`install` and fedsim's ``ray.init`` arguments
    (:func:`fedsim.engine.cluster.install`: a loopback Ray, or the cluster)."""
    ray_defaults()
    cluster.install()
    install()
    from flwr.simulation.app import flwr_simulation

    flwr_simulation()
