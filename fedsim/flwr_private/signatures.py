"""The contract of the fence: every private Flower function or method fedsim
relies on, gathered from the ``PATCHED`` table of each module of
:mod:`fedsim.flwr_private` (``tests/test_flwr_private.py`` compares it with the
installed Flower). A module of its own, so the package's ``__init__`` imports no
patch module and the patch modules can import :mod:`.version` without a cycle."""

from __future__ import annotations

from fedsim.flwr_private import arrays, linkstate, ray_backend, records, strategies, vce


def contract() -> dict[str, tuple[str, ...]]:
    """Every private Flower function or method fedsim relies on (a dotted path)
    and the parameters it expects of it."""
    table: dict[str, tuple[str, ...]] = {}
    for module in (arrays, linkstate, ray_backend, records, strategies, vce):
        table.update(module.PATCHED)
    return table
