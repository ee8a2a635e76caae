"""Which Ray node served each client: placement you can see.

In fedsim's simulation runtime (:mod:`fedsim.flwr_private.vce`) the Ray call that
ran a client returns the id and address of the Ray node its actor lives on;
the runtime tags the client's reply with them (:func:`tag`, a config record
of fedsim's own), the server's grid takes the tag off again before anything
else sees the reply (:func:`take`), and the recorder counts the clients each
node served in each phase of each round: ``summary.json``'s ``placement``
(:class:`Placement`). ``metrics.parquet`` is unchanged. Deployment runs
(SuperNodes, no Ray) have no tags and no ``placement``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message

#: The reply's config record naming the Ray node that served it.
RECORD = "fedsim-ray-node"


def tag(reply: Message, node_id: str, address: str) -> None:
    """Name the Ray node (id, address) that served ``reply``'s client."""
    reply.content[RECORD] = ConfigRecord({"id": node_id, "address": address})


def take(reply: Message) -> tuple[str, str] | None:
    """The Ray node that served ``reply`` (id, address), removed from it; None
    for an error reply or one that is not tagged."""
    if reply.has_error() or RECORD not in reply.content.config_records:
        return None
    record = reply.content.config_records[RECORD]
    del reply.content[RECORD]
    return str(record["id"]), str(record["address"])


class Placement:
    """Clients per Ray node, per phase and round, as ``summary.json`` keeps
    them: ``{"nodes": {id: address}, "rounds": {round: {phase: {id: n}}}}``
    (round keys are strings, as JSON has them)."""

    def __init__(self, saved: Mapping[str, Any] | None = None):
        saved = saved or {}
        self.nodes: dict[str, str] = dict(saved.get("nodes", {}))
        self.rounds: dict[str, dict[str, dict[str, int]]] = {
            rnd: {phase: dict(counts) for phase, counts in phases.items()}
            for rnd, phases in saved.get("rounds", {}).items()
        }

    def served(self, server_round: int, phase: str, node: tuple[str, str]) -> None:
        """One client of ``phase`` in ``server_round`` ran on ``node``."""
        node_id, address = node
        self.nodes.setdefault(node_id, address)
        counts = self.rounds.setdefault(str(server_round), {}).setdefault(phase, {})
        counts[node_id] = counts.get(node_id, 0) + 1

    def up_to(self, server_round: int) -> Placement:
        """The rounds up to ``server_round`` (what a resumed run keeps)."""
        kept = {r: p for r, p in self.rounds.items() if int(r) <= server_round}
        return Placement({"nodes": self.nodes, "rounds": kept})

    def as_json(self) -> dict[str, Any]:
        return {"nodes": dict(self.nodes), "rounds": self.rounds}

    def __bool__(self) -> bool:
        return bool(self.nodes)
