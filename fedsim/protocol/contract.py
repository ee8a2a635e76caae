"""The contract between a family and the engine, in code.

Two typed protocols say what a family's two sides provide:

- :class:`ClientAlgorithm`: the client side (``Family.client``). The ClientApp's
  router (:mod:`fedsim.engine.client.client_app`) calls ``train`` / ``evaluate`` and one
  method per custom action the family declares (``Family.actions``), all with
  the same signature (:data:`ClientMethod`).
- :class:`ServerState`: what a server strategy that keeps state across rounds
  (besides the round driver's global arrays) implements so that a resumed run
  continues exactly where it stopped. A family says whether its server has such
  state in its declaration (``Family.server_state``), and the engine checks the
  built strategy against the declaration before the first round
  (:func:`check_server_state`): a family that declares state but does not save
  it, or saves state it does not declare, fails loudly instead of resuming from
  a restarted server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from flwr.app import RecordDict

from fedsim.core.family import Family
from fedsim.core.registry import FamilyError
from fedsim.learn.data import ClientData


@runtime_checkable
class ServerState(Protocol):
    """A server strategy's state across rounds, saved in the resume checkpoint.

    ``checkpoint_state()`` returns a tree of JSON values (dicts with string keys,
    lists, numbers, strings, None) and numpy arrays; ``restore_state(state)``
    gets that tree back (tuples as lists; float ``inf``/``nan`` survive) in a
    freshly built strategy of the same experiment, and must leave it exactly as
    the saved one was at the end of the checkpointed round.
    """

    def checkpoint_state(self) -> dict[str, Any]:
        """The state to save after a completed round."""
        ...

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue from a saved state."""
        ...


class ClientMethod(Protocol):
    """``train``, ``evaluate`` and every custom action of a client algorithm."""

    def __call__(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """The reply's content to the message's ``content``, on the client's
        partition ``data``; ``state`` is the node's ``context.state`` (what the
        client keeps between rounds, saved by the engine)."""
        ...


@runtime_checkable
class ClientAlgorithm(Protocol):
    """A family's client side: built once per client process as
    ``Class(experiment, info, device)`` (the validated experiment, the
    dataset's :class:`fedsim.learn.data.DatasetInfo`, the resolved device).

    Every client trains (``train``). ``evaluate`` (local evaluation) and one
    method per declared custom action (``Family.actions``) have the same
    signature (:class:`ClientMethod`); a family whose clients never evaluate
    (split learning: the server evaluates the assembled model) may omit
    ``evaluate``, and a message it cannot route fails with the family named.
    """

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Local training: see :class:`ClientMethod`."""
        ...


def client_method(algorithm: Any, family: Family, action: str) -> ClientMethod:
    """The method of a family's client algorithm that handles ``action``
    (``train``, ``evaluate`` or a declared custom action).

    Raises
    ------
    FamilyError
        The algorithm is not a :class:`ClientAlgorithm`, or lacks the method
        the message asks for.
    """
    if not isinstance(algorithm, ClientAlgorithm):
        raise FamilyError(
            f"strategy {family.name!r}: its client {family.client!r} must define "
            "train (fedsim.protocol.contract.ClientAlgorithm)"
        )
    method = getattr(algorithm, action, None)
    if not callable(method):
        raise FamilyError(
            f"strategy {family.name!r}: its client {family.client!r} has no "
            f"method {action!r} for the server's {action!r} messages"
        )
    return method  # type: ignore[no-any-return]


def chain(strategy: Any) -> Iterator[Any]:
    """The strategy and every strategy it wraps (``.strategy``), outermost first."""
    seen: set[int] = set()
    while strategy is not None and id(strategy) not in seen:
        seen.add(id(strategy))
        yield strategy
        strategy = getattr(strategy, "strategy", None)


def stateful(strategy: Any) -> list[ServerState]:
    """The strategies of the wrapper chain that keep :class:`ServerState`."""
    return [s for s in chain(strategy) if isinstance(s, ServerState)]


def check_server_state(family: Family, strategy: Any) -> None:
    """The family's built server strategy keeps the state its declaration says.

    Raises
    ------
    FamilyError
        ``server_state=True`` but no strategy of the chain implements
        :class:`ServerState`, or ``server_state=False`` but one does.
    """
    saved = [type(s).__qualname__ for s in stateful(strategy)]
    if family.server_state and not saved:
        raise FamilyError(
            f"strategy {family.name!r} declares server_state=True but its server "
            f"{type(strategy).__qualname__} defines no checkpoint_state() / "
            "restore_state(state) (fedsim.protocol.contract.ServerState): a "
            "resumed run would restart its state"
        )
    if saved and not family.server_state:
        raise FamilyError(
            f"strategy {family.name!r}: its server {saved[0]} keeps state "
            "(checkpoint_state / restore_state) but the family declares "
            "server_state=False; declare server_state=True in its Family"
        )


__all__ = [
    "ClientAlgorithm",
    "ClientMethod",
    "ServerState",
    "check_server_state",
    "chain",
    "client_method",
    "stateful",
]
