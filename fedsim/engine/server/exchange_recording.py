"""Exchange recording: what passes through the grid becomes rows of the run.

Wrapping keeps recording out of the strategies. Any Strategy (or a custom loop
with several round trips per round) that talks through :class:`RecordingGrid`
gets per-client metrics, bytes up and down, failures, phase timings and the Ray
node that ran each client recorded. Before sending, the grid names the sweep's
experiment and the assigned partition in every message and orders the
messages slowest client first.

The grid is built from the :class:`fedsim.engine.server.transport.Transport`
(sending, waiting, deferred work) and a
:class:`fedsim.engine.server.node_directory.NodeDirectory` (which partition each
node serves); the round's rules (enough replies, replies in partition order)
are the round driver's (:class:`fedsim.engine.server.round_driver.RoundRules`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedsim.core.messages import (
    CONFIG,
    EXPERIMENT,
    NUM_EXAMPLES,
    PARTITION_ID,
    SECONDS,
    SERVER_ROUND,
)
from fedsim.engine.server import placement
from fedsim.engine.server.node_directory import NodeDirectory
from fedsim.engine.server.run_recorder import RunRecorder
from fedsim.engine.server.transport import Transport

_RENAMED = {NUM_EXAMPLES: "examples"}

#: ``observer(server_round, messages, replies, partition_of)``.
Observer = Callable[[int, list[Message], list[Message], Mapping[int, int]], None]


def array_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (their serialised payload)."""
    return sum(int(rec.count_bytes()) for rec in content.array_records.values())


class RecordingGrid(Transport):
    """A :class:`Transport` over ``grid`` that records every exchange.

    Parameters
    ----------
    grid : Grid
        Flower's Grid given to the ServerApp.
    recorder : RunRecorder
        Where rows go.
    num_clients, connect_timeout, partitions, assign
        The :class:`NodeDirectory`'s.
    experiment : int, optional
        In a sweep, the experiment's index, set in every message's ``config``
        so that clients serve it with that experiment's settings.
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
        connect_timeout: float = 300.0,
        experiment: int | None = None,
        partitions: Mapping[int, int] | None = None,
        assign: bool = False,
        observer: Observer | None = None,
    ):
        super().__init__(grid)
        self.directory = NodeDirectory(
            self,
            num_clients=num_clients,
            connect_timeout=connect_timeout,
            partitions=partitions,
            assign=assign,
        )
        self.recorder = recorder
        self.experiment = experiment
        self.observer = observer
        #: (phase, partition) -> seconds its client took there last time
        self._seconds: dict[tuple[str, int], float] = {}
        #: The round being run (set by the round driver); messages without a
        #: ``server-round`` in their config are recorded under it.
        self.server_round = 0

    def partitions(self) -> dict[int, int]:
        """Map node id -> partition id (:meth:`NodeDirectory.partitions`)."""
        return self.directory.partitions()

    def get_node_ids(self) -> list[int]:
        """Node ids ordered by partition id (stable across runs)."""
        return self.directory.node_ids()

    def partition_of(self, reply: Message) -> int:
        """The partition of the node that sent ``reply``."""
        return self.partitions()[reply.metadata.src_node_id]

    def round_of(self, message: Message) -> int:
        """The round ``message`` belongs to: its ``config``'s ``server-round``,
        or the round being run."""
        config = message.content.config_records.get(CONFIG)
        if config and SERVER_ROUND in config:
            return int(config[SERVER_ROUND])  # type: ignore[arg-type]
        return self.server_round

    # -- before sending ------------------------------------------------------------
    def _slowest_first(
        self, messages: list[Message], phase: str, partition_of: Mapping[int, int]
    ) -> list[Message]:
        """``messages`` ordered by the seconds their clients took in this phase
        last time, slowest first; clients not seen yet first of all, in the
        given order. The simulation runtime hands clients out in push order to
        whichever actor has room (two calls each, short clients several to a
        call, :mod:`fedsim.flwr_private.vce`): longest processing time first
        shortens the round's tail. The round driver sorts replies by partition
        whatever the order, so results do not depend on it."""

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
        assign = self.directory.assign
        if not stamp and not assign:
            return
        for message in messages:
            content = RecordDict(dict(message.content.items()))
            config = ConfigRecord(dict(content.config_records.get(CONFIG, {})))
            config.update(stamp)
            if assign:
                config[PARTITION_ID] = partition_of[message.metadata.dst_node_id]
            content[CONFIG] = config
            message.content = content

    # -- recording -----------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send, wait, and record per-client metrics, bytes and failures;
        the replies in arrival order."""
        messages = list(messages)
        if not messages:
            return []
        partition_of = self.partitions()
        first = messages[0]
        # ``train.<action>`` exchanges are recorded under the ``train`` phase
        phase = first.metadata.message_type.split(".")[0]
        server_round = self.round_of(first)
        down = {m.metadata.dst_node_id: array_bytes(m.content) for m in messages}
        if len(down) < len(messages):
            raise ValueError(
                "one message per node per exchange: a node was sent two messages"
            )
        self._stamp(messages, partition_of)
        messages = self._slowest_first(messages, phase, partition_of)
        start = time.perf_counter()
        replies = self.send_and_wait(messages, timeout=timeout)
        self.recorder.phase_seconds(server_round, phase, time.perf_counter() - start)
        for reply in replies:
            self._record(server_round, phase, reply, partition_of, down)
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
        return replies

    def _record(
        self,
        server_round: int,
        phase: str,
        reply: Message,
        partition_of: Mapping[int, int],
        down: dict[int, int],
    ) -> None:
        """One reply's row: its metrics and bytes, or its failure (its node is
        taken off ``down``, the bytes sent to nodes that have not replied)."""
        node = reply.metadata.src_node_id
        self.recorder.placed(server_round, phase, placement.take(reply))
        sent = {"bytes-down": down.pop(node, 0)}
        pid = partition_of[node]
        if reply.has_error():
            reason = reply.error.reason or ""
            self.recorder.failure(server_round, phase, pid, reason, sent)
            return
        values = {
            _RENAMED.get(k, k): float(v)  # type: ignore[arg-type]
            for record in reply.content.metric_records.values()
            for k, v in record.items()
            if k != PARTITION_ID
        }
        values.update(sent, **{"bytes-up": array_bytes(reply.content)})
        self.recorder.client(server_round, phase, pid, values)
        if SECONDS in values:
            self._seconds[(phase, pid)] = values[SECONDS]
