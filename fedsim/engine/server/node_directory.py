"""Which partition each node serves: asked once, or assigned.

In a deployment each SuperNode holds its own data and says which partition it
is (one ``query`` message per node before the first round). The nodes of
Flower's simulation runtime are interchangeable virtual nodes holding no data
of their own: the directory assigns partition ``i`` to the ``i``-th node id in
sorted order instead, and the exchange recording names it in every message
(:mod:`fedsim.engine.server.exchange_recording`), which the ClientApp serves. A
node always serves the same partition, so its ``context.state`` stays that
client's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedsim.core.errors import RoundFailed
from fedsim.core.messages import CONFIG, METRICS, PARTITION_ID, SERVER_ROUND
from fedsim.engine.server.transport import Transport


class NodeDirectory:
    """Node id -> partition id, found once through ``transport``.

    Parameters
    ----------
    transport : Transport
        The ServerApp's transport.
    num_clients : int
        Nodes to wait for before the first round.
    connect_timeout : float
        Seconds to wait for ``num_clients`` nodes to connect.
    partitions : mapping of int to int, optional
        The map when already known (a sweep's earlier experiment found it).
    assign : bool
        Assign partitions to (simulated) nodes instead of asking them.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        num_clients: int,
        connect_timeout: float = 300.0,
        partitions: Mapping[int, int] | None = None,
        assign: bool = False,
    ):
        self.transport = transport
        self.num_clients = num_clients
        self.connect_timeout = connect_timeout
        self.assign = assign
        self._partition_of: dict[int, int] = dict(partitions or {})

    def partitions(self) -> dict[int, int]:
        """Map node id -> partition id, finding it the first time."""
        if not self._partition_of:
            self._partition_of = self._discover()
        return self._partition_of

    def node_ids(self) -> list[int]:
        """Node ids ordered by partition id (stable across runs)."""
        found = self.partitions()
        return sorted(found, key=found.__getitem__)

    def _discover(self) -> dict[int, int]:
        deadline = time.monotonic() + self.connect_timeout
        while len(nodes := self.transport.connected_node_ids()) < self.num_clients:
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
        replies = self.transport.send_and_wait(messages, timeout=self.connect_timeout)
        for reply in replies:
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
