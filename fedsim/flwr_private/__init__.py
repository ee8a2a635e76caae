"""The fence around Flower's private API: the one fedsim package that imports it.

fedsim builds on Flower's public API (``flwr.app``, ``flwr.serverapp``,
``flwr.serverapp.strategy``, ``flwr.clientapp``, ``flwr.simulation``: what
Flower's API reference documents). Where it needs more, it goes through this
package, so a new Flower version breaks one place, which
``tests/test_flwr_private.py`` checks:

- :mod:`.linkstate`, :mod:`.vce`, :mod:`.ray_backend`, :mod:`.arrays`: patches of
  Flower 1.41's simulation runtime (speed-ups, and fedsim's ``ray.init``
  arguments); each is made only on the Flower it was written against and warns
  once where it is skipped (:mod:`.version`);
- :mod:`.records`, :mod:`.strategies`: Flower's private helpers fedsim calls
  (record serialisation, the replies a strategy aggregates, the norm its DP
  wrappers clip to, Flower's log).

Every private function or method used is listed, with its parameters, in its
module's ``PATCHED`` table; the contract test compares them with the installed
Flower's (:func:`fedsim.flwr_private.signatures.contract`).
"""

from __future__ import annotations

from fedsim.flwr_private.records import (
    recorddict_from_bytes,
    recorddict_to_bytes,
    set_task_identity,
)
from fedsim.flwr_private.strategies import log, norm, valid_replies

__all__ = [
    "log",
    "norm",
    "recorddict_from_bytes",
    "recorddict_to_bytes",
    "set_task_identity",
    "valid_replies",
]
