"""Recording wrappers around Flower's Grid and Strategy.

Wrapping keeps recording out of the strategies. Any Strategy (or a custom loop
with several round trips per round) that talks through :class:`RecordingGrid` gets
per-client metrics, bytes up and down, failures and phase timings recorded, and
samples nodes in partition order so that a seeded sampler is reproducible.
:class:`RecordingStrategy` records the metrics a strategy computes itself (those
no client sent, e.g. ``aggregation-error``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.core.errors import RoundFailed
from fedsim.core.messages import (
    CONFIG,
    EXPERIMENT,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    SECONDS,
    SERVER_ROUND,
)
from fedsim.core.seeding import derive_seed
from fedsim.engine.server import placement
from fedsim.engine.server.run_recorder import RunRecorder
from fedsim.flwr_private import linkstate
from fedsim.protocol.wrapping import DelegatingStrategy

_RENAMED = {NUM_EXAMPLES: "examples"}
#: ``observer(server_round, messages, replies, partition_of)``.
Observer = Callable[[int, list[Message], list[Message], Mapping[int, int]], None]


def array_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (their serialised payload)."""
    return sum(int(rec.count_bytes()) for rec in content.array_records.values())


class RecordingGrid(Grid):
    """Delegates to ``grid``; records what passes through ``send_and_receive``.

    Parameters
    ----------
    grid : Grid
        Flower's Grid given to the ServerApp.
    recorder : RunRecorder
        Where rows go.
    num_clients : int
        Nodes to wait for before the first round.
    min_replies : int
        Fewest successful training replies a round needs.
    connect_timeout : float
        Seconds to wait for ``num_clients`` nodes to connect.
    experiment : int, optional
        In a sweep, the experiment's index, set in every message's ``config``
        so that clients serve it with that experiment's settings.
    partitions : mapping of int to int, optional
        Node id -> partition id when already known (a sweep's earlier
        experiment found it); otherwise every node is asked once.
    assign : bool
        The nodes are interchangeable virtual nodes of Flower's simulation
        runtime, which hold no data of their own: instead of asking every node
        for its partition (one message per node before the first round), the
        grid assigns partition ``i`` to the ``i``-th node id in sorted order
        and names it in every message's ``config`` (``partition-id``), which
        the ClientApp serves. A node always serves the same partition, so its
        ``context.state`` stays that client's.
    observer : callable, optional
        ``observer(server_round, messages, replies, partition_of)``, told of
        every exchange once its replies are in (the privacy audit listens).
    """

    def __init__(
        self,
        grid: Grid,
        recorder: RunRecorder,
        *,
        num_clients: int,
        min_replies: int,
        connect_timeout: float = 300.0,
        experiment: int | None = None,
        partitions: Mapping[int, int] | None = None,
        assign: bool = False,
        observer: Observer | None = None,
    ):
        self.grid = grid
        self.assign = assign
        self.observer = observer
        #: (phase, partition) -> seconds its client took there last time
        self._seconds: dict[tuple[str, int], float] = {}
        self.experiment = experiment
        self.recorder = recorder
        self.num_clients = num_clients
        self.min_replies = min_replies
        self.connect_timeout = connect_timeout
        #: The round being run (set by the round driver); messages without a
        #: ``server-round`` in their config are recorded under it.
        self.server_round = 0
        self._partition_of: dict[int, int] = dict(partitions or {})
        #: Work to run once the next messages are out (:meth:`defer`).
        self._deferred: Callable[[], None] | None = None

    # -- delegation ------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = list(self.grid.push_messages(messages))
        self.run_deferred()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # -- work done while clients work -------------------------------------------
    def defer(self, job: Callable[[], None]) -> None:
        """Run ``job`` as soon as the next messages are pushed, while their
        clients work, or at :meth:`run_deferred`, whichever comes first (the
        round driver closes a round this way)."""
        if self._deferred is not None:
            raise RuntimeError("the grid holds a deferred job already")
        self._deferred = job

    def run_deferred(self) -> None:
        """Run the deferred job now, if one waits (once)."""
        job, self._deferred = self._deferred, None
        if job is not None:
            job()

    # -- partition-aware node list ---------------------------------------------
    def partitions(self) -> dict[int, int]:
        """Map node id -> partition id, asking every node once."""
        if not self._partition_of:
            self._partition_of = self._discover()
        return self._partition_of

    def _discover(self) -> dict[int, int]:
        deadline = time.monotonic() + self.connect_timeout
        while len(nodes := list(self.grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise RoundFailed(
                    f"only {len(nodes)} of {self.num_clients} clients connected "
                    f"within {self.connect_timeout:.0f} s"
                )
            time.sleep(0.2)
        if self.assign:
            return {node: i for i, node in enumerate(sorted(nodes))}
        content = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 0})})
        messages = [
            Message(content, dst_node_id=node, message_type=MessageType.QUERY)
            for node in nodes
        ]
        found: dict[int, int] = {}
        for reply in self._send_and_wait(messages, timeout=self.connect_timeout):
            if reply.has_error():
                raise RoundFailed(
                    f"node {reply.metadata.src_node_id} did not report its partition: "
                    f"{reply.error.reason}"
                )
            pid = int(reply.content[METRICS][PARTITION_ID])  # type: ignore[arg-type]
            found[reply.metadata.src_node_id] = pid
        if len(found) < len(nodes):
            raise RoundFailed(
                f"{len(nodes) - len(found)} nodes did not answer discovery"
            )
        return found

    def get_node_ids(self) -> list[int]:
        """Node ids ordered by partition id (stable across runs)."""
        return sorted(self.partitions(), key=self.partitions().__getitem__)

    # -- sending ---------------------------------------------------------------
    #: First and largest pause between two polls for replies (seconds).
    POLL_FIRST = 0.001
    POLL_MAX = 0.05

    def _send_and_wait(
        self, messages: list[Message], *, timeout: float | None
    ) -> list[Message]:
        """Push ``messages`` and collect their replies until all arrived or
        ``timeout`` passed.

        Flower's grids pause 0.1 s (simulation) to 3 s between polls. In
        simulation (a LinkState that signals its waiters, see
        :mod:`fedsim.flwr_private.linkstate`) this waits for a reply to be stored and
        pulls the replies that came; everywhere else it polls, the pause
        starting at 1 ms and growing 1.5x per empty poll up to 50 ms, back to
        1 ms whenever a reply arrives. Either way every pending message is
        pulled whenever 50 ms pass without a reply, so expired messages come
        back as errors as they do from Flower's own loop.

        A deferred job (:meth:`defer`) runs once the messages are out; the
        timeout counts from its end.
        """
        state = getattr(self.grid, "state", None)
        watched = state is not None and linkstate.watched(state)
        sent = {i for i in self.grid.push_messages(messages) if i is not None}
        pending = set(sent)
        if watched:
            linkstate.await_replies(state, sent)
        self.run_deferred()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = self.POLL_FIRST
        ready = pending
        try:
            while pending:
                arrived = list(self.grid.pull_messages(ready & pending))
                if arrived:
                    replies.extend(arrived)
                    pending.difference_update(
                        m.metadata.reply_to_message_id for m in arrived
                    )
                    pause = self.POLL_FIRST
                    if not watched:
                        continue
                if not pending or (
                    deadline is not None and time.monotonic() >= deadline
                ):
                    break
                wait = self.POLL_MAX
                if deadline is not None:
                    wait = min(wait, max(deadline - time.monotonic(), 0.0))
                if watched:
                    ready = linkstate.wait_for_replies(state, pending, wait) or pending
                else:
                    time.sleep(min(pause, wait))
                    pause = min(pause * 1.5, self.POLL_MAX)
        finally:
            if watched:
                linkstate.forget_replies(state, sent)
        return replies

    def _slowest_first(
        self, messages: list[Message], phase: str, partition_of: Mapping[int, int]
    ) -> list[Message]:
        """``messages`` ordered by the seconds their clients took in this phase
        last time, slowest first; clients not seen yet first of all, in the
        given order. The simulation runtime hands clients out in push order to
        whichever actor has room (two calls each, short clients several to a
        call, :mod:`fedsim.flwr_private.vce`): longest processing time first shortens
        the round's tail. Replies are sorted by partition whatever the order, so
        results do not depend on it."""

        def took(message: Message) -> float:
            key = (phase, partition_of[message.metadata.dst_node_id])
            return -self._seconds.get(key, float("inf"))

        return sorted(messages, key=took)

    def _stamp(self, messages: list[Message], partition_of: Mapping[int, int]) -> None:
        """Name the sweep's experiment and the assigned partition in each
        message's ``config``. Strategies often send one content object to every
        node, so each message gets its own content and config record (the
        arrays are shared, not copied)."""
        stamp: dict[str, int] = {}
        if self.experiment is not None:
            stamp[EXPERIMENT] = self.experiment
        if not stamp and not self.assign:
            return
        for message in messages:
            content = RecordDict(dict(message.content.items()))
            config = ConfigRecord(dict(content.config_records.get(CONFIG, {})))
            config.update(stamp)
            if self.assign:
                config[PARTITION_ID] = partition_of[message.metadata.dst_node_id]
            content[CONFIG] = config
            message.content = content

    # -- recording -------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send, wait, and record per-client metrics, bytes and failures."""
        messages = list(messages)
        if not messages:
            return []
        partition_of = self.partitions()
        first = messages[0]
        # ``train.<action>`` exchanges are recorded under the ``train`` phase
        phase = first.metadata.message_type.split(".")[0]
        config = first.content.config_records.get(CONFIG)
        server_round = self.server_round
        if config and SERVER_ROUND in config:
            server_round = int(config[SERVER_ROUND])  # type: ignore[arg-type]
        down = {m.metadata.dst_node_id: array_bytes(m.content) for m in messages}
        if len(down) < len(messages):
            raise ValueError(
                "one message per node per exchange: a node was sent two messages"
            )
        self._stamp(messages, partition_of)
        messages = self._slowest_first(messages, phase, partition_of)
        start = time.perf_counter()
        replies = self._send_and_wait(messages, timeout=timeout)
        self.recorder.phase_seconds(server_round, phase, time.perf_counter() - start)
        ok = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            self.recorder.placed(server_round, phase, placement.take(reply))
            sent = {"bytes-down": down.pop(node, 0)}
            if reply.has_error():
                self.recorder.failure(
                    server_round,
                    phase,
                    partition_of[node],
                    reply.error.reason or "",
                    sent,
                )
                continue
            ok += 1
            values = {
                _RENAMED.get(k, k): float(v)  # type: ignore[arg-type]
                for record in reply.content.metric_records.values()
                for k, v in record.items()
                if k != PARTITION_ID
            }
            values.update(sent, **{"bytes-up": array_bytes(reply.content)})
            self.recorder.client(server_round, phase, partition_of[node], values)
            if SECONDS in values:
                self._seconds[(phase, partition_of[node])] = values[SECONDS]
        for node, sent_bytes in down.items():  # no reply before the timeout
            self.recorder.failure(
                server_round,
                phase,
                partition_of[node],
                f"no reply within federation.round-timeout = {timeout:g} s",
                {"bytes-down": sent_bytes},
            )
        if self.observer is not None:
            self.observer(server_round, messages, replies, partition_of)
        # Only the round's opening train exchange: a family's own exchanges
        # (``train.<action>``) may address fewer nodes (e.g. one at a time) and
        # check what their round needs themselves.
        if first.metadata.message_type == MessageType.TRAIN and ok < self.min_replies:
            late = (
                f"; {len(down)} did not reply within federation.round-timeout = "
                f"{timeout:g} s"
                if down
                else ""
            )
            raise RoundFailed(
                f"round {server_round}: {ok} of {len(messages)} clients replied, "
                f"fewer than federation.min-replies = {self.min_replies}{late}"
            )
        # Replies arrive in an order that depends on timing; floating-point sums
        # over them (every weighted average) must not.
        return sorted(replies, key=lambda r: partition_of[r.metadata.src_node_id])


def _client_keys(replies: list[Message]) -> set[str]:
    return {
        key
        for reply in replies
        if not reply.has_error()
        for record in reply.content.metric_records.values()
        for key in record
    }


class RecordingStrategy(DelegatingStrategy):
    """Delegates to ``strategy``; records the metrics it adds when aggregating.

    Flower's samplers draw from the global ``random`` module, which Flower's own
    threads (heartbeats, retries) also draw from at moments that depend on timing.
    So the module is reseeded from ``(seed, phase, round)`` right before each
    ``configure_*`` call: the clients sampled in a round depend on the seed alone.
    """

    def __init__(self, strategy: Strategy, recorder: RunRecorder, *, seed: int):
        super().__init__(strategy)
        self.recorder = recorder
        self.seed = seed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if isinstance(grid, RecordingGrid):
            grid.partitions()  # discovery first: it must not run after the reseed
        random.seed(derive_seed(self.seed, "sample-train", server_round))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if isinstance(grid, RecordingGrid):
            grid.partitions()
        random.seed(derive_seed(self.seed, "sample-evaluate", server_round))
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def _record(
        self, server_round: int, phase: str, replies: list[Message], metrics: Any
    ) -> None:
        if metrics is None:
            return
        sent = _client_keys(replies)
        own = {
            k: float(v)
            for k, v in metrics.items()
            if k not in sent and isinstance(v, (int, float))
        }
        if own:
            self.recorder.strategy(server_round, phase, own)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self._record(server_round, MessageType.TRAIN, replies, metrics)
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        self._record(server_round, MessageType.EVALUATE, replies, metrics)
        return metrics
