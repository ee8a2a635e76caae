"""Flower's simulation runtime, started by fedsim: no hand-off waits for a poll.

A SuperLink in simulation mode runs each run in a ``flwr-simulation`` process:
the ServerApp in one thread, Flower's Virtual Client Engine (``vce_api``) in
others. Flower 1.41's engine moves messages between them by polling:

- its pick-up thread asks the LinkState for every node's next message, then
  sleeps 0.1 s (``add_messages_to_queue``): every exchange waited 0-0.1 s
  before its first client started, and a split-learning round of 40 exchanges
  spent 3.6 of its 4.1 s there;
- the ServerApp's grid polls for replies (fedsim's grid waits on the LinkState
  instead, see :class:`fedsim.engine.server.transport.Transport`).

fedsim's SuperLinks find a ``flwr-simulation`` launcher first on their ``PATH``
(:mod:`fedsim.engine.server.simulation_process`, in the SuperLink's private
``FLWR_HOME``); it calls :func:`install` and then Flower's own
``flwr-simulation`` entry point, so the runtime is Flower's, with these
replacements made before it starts:

- the LinkState methods of :mod:`fedsim.flwr_private.linkstate` (indexed pick-up,
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
- ``RayBackend.build`` and ``terminate``
  (:func:`fedsim.flwr_private.ray_backend.pipeline`): each actor holds
  two calls at once, one running and one queued in Ray, so it starts the
  next client as soon as one ends instead of idling while the reply travels
  back and the next message travels out (1.8 ms a message here). With 1,000
  clients x 100 a round the actors were idle 41% of the time; pipelining
  took the round from 0.62 to 0.54 s. An actor still runs one client at a
  time, so an actor's memory (and a GPU share) is unchanged.

Nothing is replaced on another Flower version than 1.41 (the launcher then
runs Flower's runtime unchanged, with one warning per skipped patch), nor in a
SuperLink fedsim did not start.

What fedsim does around each client's run in the simulation process (restore
and save its state, tag the reply with the Ray node that ran it) comes in as a
:class:`Relay` given to :func:`install`: this package knows Flower, not fedsim.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import ERROR
from queue import Empty, Queue
from typing import Any
from uuid import uuid4

from fedsim.flwr_private import linkstate, ray_backend, version

#: Longest pause between two sweeps (Flower's fixed pause): the stop event is
#: checked at least this often.
SWEEP = 0.1
#: Most messages one Ray call carries (see :func:`batch_size`).
BATCH = 8
#: Seconds of client work one Ray call carries at most (see :func:`batch_size`):
#: a call costs about 2 ms of CPU, 4% of this.
CALL_SECONDS = 0.05
VCE = "flwr.server.superlink.fleet.vce.vce_api"
#: Flower's functions this module replaces or calls, and their parameters.
PATCHED = {
    f"{VCE}.add_messages_to_queue": ("state", "queue", "nodes_mapping", "f_stop"),
    f"{VCE}.worker": (
        "messageins_queue",
        "messageres_queue",
        "node_info_store",
        "backend",
        "f_stop",
        "metrics",
    ),
    "flwr.simulation.ray_transport.ray_actor.ClientAppActor.run": (
        "client_app_fn",
        "message",
        "cid",
        "context",
    ),
    "flwr.simulation.app.flwr_simulation": (),
}
#: What a run loses where the replacements are skipped.
LOSES = "waits up to 0.1 s per hand-off and makes one Ray call a message"


def _nothing(*_: Any) -> None:
    """A relay step that does nothing."""


@dataclass(frozen=True)
class Relay:
    """What fedsim does around each client's run, in the simulation process.

    ``before(config, context)`` once the node's context is retrieved, before
    the Ray call; ``after(config, context)`` once the reply's context is back;
    ``tag(reply, ray_node_id, address)`` on each reply (``config``: the
    message's ``config`` record)."""

    before: Callable[[Any, Any], None] = _nothing
    after: Callable[[Any, Any], None] = _nothing
    tag: Callable[[Any, str, str], None] = _nothing


#: The relay :func:`worker` uses (set by :func:`install`).
_relay = Relay()


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
    backend: Any,
    node_info_store: dict[int, Any],
    messages: Sequence[Any],
    relay: Relay | None = None,
) -> list[Any]:
    """Run ``messages`` in one call to one actor of ``backend`` (a built
    ``RayBackend``); one reply each, in order: the ClientApp's, tagged with
    the Ray node that ran it (``relay.tag``), or an error reply as Flower's
    worker sends one when the run raised. ``relay.before`` / ``relay.after``
    run around each client's call, whichever node runs it (by default the
    :class:`Relay` :func:`install` was given)."""
    import ray

    relay = relay or _relay
    from flwr.common.constant import PARTITION_ID_KEY

    outcomes: list[Any] = []
    jobs = []
    for message in messages:
        try:
            context = node_info_store[message.metadata.dst_node_id].retrieve_context(
                run_id=message.metadata.run_id
            )
            relay.before(_config(message), context)
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
        relay.after(_config(message), context)
        if node[0]:
            relay.tag(reply, *node)
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


def install(given: Relay | None = None) -> bool:
    """Make the replacements (see module doc), with ``given`` around each
    client's run; False, and nothing replaced, on a Flower version they were
    not written for (warning once)."""
    if not version.patchable("vce", LOSES):
        return False
    global _relay
    _relay = given or Relay()
    # the simulation runtime's modules, imported before it starts
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import in_memory_linkstate  # noqa: F401

    linkstate.install()
    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api.worker = worker
    ray_backend.pipeline_actors()
    return True


def run_flower_simulation() -> None:
    """Flower's own ``flwr-simulation`` entry point (reads ``sys.argv``)."""
    from flwr.simulation.app import flwr_simulation

    flwr_simulation()
