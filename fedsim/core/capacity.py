"""Per-client capacity as an experiment setting (no torch, importable anywhere).

Families for capacity-heterogeneous federations (``heterofl``, ``pa3dfl``,
``fedprophet``) declare the same key in their option table,
``strategy.capacities``: a list of width ratios in (0, 1]; client (partition)
``i`` gets entry ``i mod len``. ``[1.0, 0.5, 0.25]`` over 20 clients gives
seven full-size clients, seven half-width and six quarter-width ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedsim.core.errors import ConfigError
from fedsim.core.schema import option


def _ratios(v: tuple[float, ...]) -> str | None:
    if not v:
        return "must name at least one width ratio"
    if all(0 < r <= 1 for r in v):
        return None
    return "every width ratio must be in (0, 1]"


def capacities_option(default: Sequence[float] = (1.0, 0.5, 0.25)) -> Any:
    """The ``capacities`` key of a family's option table."""
    return option(
        list(default),
        "width ratio of each client, in (0, 1]: client i gets entry i mod len",
        _ratios,
    )


def capacity_of(capacities: Sequence[float], partition_id: int) -> float:
    """Client ``partition_id``'s entry of ``capacities`` (``i mod len``)."""
    return float(capacities[partition_id % len(capacities)])


def check_per_client(key: str, values: Sequence[Any], clients: int) -> None:
    """A per-client list (client ``i`` gets entry ``i mod len``) has no entry
    that no client gets (ConfigError naming ``key``)."""
    if len(values) > clients:
        raise ConfigError(
            f"{key}: {len(values)} entries for federation.clients = {clients}; "
            f"client i gets entry i mod len, so entries after the first {clients} "
            "would go to no client"
        )
