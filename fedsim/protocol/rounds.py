"""Rounds of any shape.

A family's server side is a Flower message-API ``Strategy``. The round driver
(:mod:`fedsim.engine.server.round_driver`) runs each round through :func:`run_round`:

- a strategy without ``run_round`` gets :func:`standard_round` (FedAvg's shape:
  ``configure_train`` -> replies -> ``aggregate_train``, then the same for
  ``evaluate``);
- a strategy with ``run_round(server_round, arrays, grid, *, timeout, hooks)``
  runs its own shape: several exchanges, custom message actions
  (``train.<action>``, routed on the client to the client algorithm's method of
  that name), each node its own content (:func:`exchange`);
- a strategy without a global model takes :class:`WithoutGlobalModel`'s
  ``run_round``: FedAvg's shape over empty arrays.

``hooks`` is the outermost strategy (a wrapper when recording or privacy wrap
the family): a round calls ``hooks.configure_train`` / ``hooks.aggregate_train``
(and the evaluate pair) rather than its own methods, so that every wrapper's
hooks apply, and wrappers forward ``run_round`` to the family
(:class:`fedsim.protocol.wrapping.DelegatingStrategy`), so that no wrapper
bypasses the family's own round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid

from fedsim.core.messages import CONFIG, METRICS, PARTITION_ID, SERVER_ROUND


def run_round(
    strategy: Any,
    server_round: int,
    arrays: ArrayRecord | None,
    grid: Grid,
    *,
    timeout: float,
) -> ArrayRecord | None:
    """One round of ``strategy`` (the outermost wrapper); returns the new global
    arrays (or the old ones, or None for families without a global model)."""
    shaped = getattr(strategy, "run_round", None)
    if shaped is not None:
        return shaped(server_round, arrays, grid, timeout=timeout, hooks=strategy)  # type: ignore[no-any-return]
    return standard_round(strategy, server_round, arrays, grid, timeout=timeout)


def standard_round(
    hooks: Any,
    server_round: int,
    arrays: ArrayRecord | None,
    grid: Grid,
    *,
    timeout: float,
) -> ArrayRecord | None:
    """FedAvg's round shape, as Flower's ``Strategy.start`` runs one round."""
    assert arrays is not None, "the standard round needs global arrays"
    messages = hooks.configure_train(server_round, arrays, ConfigRecord(), grid)
    replies = grid.send_and_receive(messages, timeout=timeout)
    new, _ = hooks.aggregate_train(server_round, replies)
    if new is not None:
        arrays = new
    messages = hooks.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
    replies = grid.send_and_receive(messages, timeout=timeout)
    hooks.aggregate_evaluate(server_round, replies)
    return arrays


class WithoutGlobalModel:
    """Mixin for a FedAvg-shaped strategy whose server holds no global model
    (local-only, personalised content per client): :func:`standard_round` over
    empty arrays; the round returns None. Put it before the Flower strategy in
    the bases."""

    def run_round(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        grid: Grid,
        *,
        timeout: float,
        hooks: Any,
    ) -> ArrayRecord | None:
        """FedAvg's round shape (through ``hooks``) with empty arrays."""
        standard_round(hooks, server_round, ArrayRecord(), grid, timeout=timeout)
        return None


class SharedPart:
    """Mixin for a FedAvg-shaped strategy whose server holds only the part of
    the model every client shares (a body, a hypernetwork) in ``shared``, with
    no global model to evaluate: :func:`standard_round` over ``shared``, the
    round returns None, and ``shared`` is the server state a resume restores.
    Put it before the Flower strategy in the bases."""

    #: The current shared part.
    shared: ArrayRecord

    def run_round(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        grid: Grid,
        *,
        timeout: float,
        hooks: Any,
    ) -> ArrayRecord | None:
        """FedAvg's round (through ``hooks``) over the shared part."""
        new = standard_round(hooks, server_round, self.shared, grid, timeout=timeout)
        if new is not None:
            self.shared = new
        return None

    def checkpoint_state(self) -> dict[str, Any]:
        """The shared part's arrays, in order."""
        return {"shared": {k: a.numpy() for k, a in self.shared.items()}}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpointed shared part."""
        self.shared = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in state["shared"].items()}
        )


def exchange(
    grid: Grid,
    contents: Mapping[int, RecordDict],
    *,
    server_round: int,
    action: str = "",
    category: str = MessageType.TRAIN,
    timeout: float,
) -> dict[int, Message]:
    """Send each node its own content and wait for every reply.

    One message per node is in flight (``contents`` maps a node id to its
    content); the round number is set in each content's ``config`` record.

    Parameters
    ----------
    grid : Grid
        The round's grid.
    contents : mapping of int to RecordDict
        Node id -> what that node gets.
    server_round : int
        The current round.
    action : str
        Custom action: the message type is ``<category>.<action>``; empty for
        the category's default.
    category : str
        ``train`` (the default) or ``evaluate``: the phase the exchange's bytes
        and seconds are recorded under.
    timeout : float
        Seconds to wait for the replies.

    Returns
    -------
    dict of int to Message
        Node id -> reply (replies with errors included; nodes that did not
        answer in time are absent).
    """
    message_type = f"{category}.{action}" if action else category
    messages = []
    for node, content in contents.items():
        config = content.config_records.get(CONFIG, ConfigRecord())
        config[SERVER_ROUND] = server_round
        content[CONFIG] = config
        messages.append(Message(content, dst_node_id=node, message_type=message_type))
    replies = grid.send_and_receive(messages, timeout=timeout)
    return {reply.metadata.src_node_id: reply for reply in replies}


def node_partitions(
    grid: Grid, nodes: Iterable[int], *, timeout: float = 60.0
) -> dict[int, int]:
    """Node id -> partition id, for a family whose content depends on the client
    (e.g. its capacity).

    The engine's recording grid already knows the map (``grid.partitions()``);
    any other grid is asked with a ``query`` message per node (the ClientApp
    answers with its partition id).
    """
    known = getattr(grid, "partitions", None)
    if callable(known):
        known = known()
    if isinstance(known, Mapping):
        return {int(n): int(p) for n, p in known.items()}
    replies = exchange(
        grid,
        {node: RecordDict() for node in nodes},
        server_round=0,
        category=MessageType.QUERY,
        timeout=timeout,
    )
    return {
        node: int(reply.content[METRICS][PARTITION_ID])  # type: ignore[arg-type]
        for node, reply in replies.items()
        if not reply.has_error()
    }


def per_node(
    messages: Iterable[Message],
    grid: Grid,
    content: Callable[[Message, int], RecordDict],
) -> list[Message]:
    """``messages`` (one per sampled node, as FedAvg's ``configure_*`` makes
    them), each re-addressed with its node's own content: ``content(message,
    partition_id)``; the message type is kept."""
    messages = list(messages)
    partition_of = node_partitions(grid, [m.metadata.dst_node_id for m in messages])
    return [
        Message(
            content(msg, partition_of[msg.metadata.dst_node_id]),
            dst_node_id=msg.metadata.dst_node_id,
            message_type=msg.metadata.message_type,
        )
        for msg in messages
    ]
