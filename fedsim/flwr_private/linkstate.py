"""Flower's in-memory LinkState with pending messages indexed by destination node.

In simulation, Flower 1.41's runtime asks the LinkState for every node's next
message every 0.1 s (``vce_api.add_messages_to_queue``), and
``InMemoryLinkState.get_message_ins`` validates every stored message for every
node it is asked about: O(nodes x messages) per sweep. With 1,000 nodes and a
round's 100 messages in flight the sweep never rests: py-spy put 88 % of the
simulation process's samples there, a whole core taken from the clients.

:func:`install` replaces methods of that class. fedsim's simulation launcher
(:mod:`fedsim.flwr_private.vce`) calls it before Flower's runtime starts; the
ServerApp calls it too when imported (a simulation on a SuperLink fedsim did not
start, where the class is already loaded):

- ``store_message_ins`` stores as before and also records the message id under
  its destination node;
- ``get_message_ins`` reads only that node's pending ids, validates those
  (expiry, federation: Flower's own ``_check_stored_messages``) and returns the
  same messages, in the same order, marked delivered as before.

The one difference: Flower's query also deleted *other* nodes' expired messages
as a side effect; here they are deleted when their own node asks, or when the
server pulls their replies (``get_message_res`` checks them too). The SQL
LinkState and every other method are untouched. The replacement is installed
only on the Flower version it was written against (1.41; on another one it
warns once, :func:`fedsim.flwr_private.version.patchable`), and only in a process
that already holds Flower's in-memory LinkState (the simulation runtime's): the
module that defines it pulls in the SuperLink's database stack (about 1 s of
imports) that a deployed ServerApp does not need.

Two more replacements make the runtime's hand-offs wake their reader instead of
waiting for its next poll: ``store_message_ins`` and ``store_message_res`` also
notify the state's :class:`Signals` (the pick-up then lists the nodes with a
message in the order their messages were pushed, :func:`pending_nodes`).
:func:`wait_for_messages` is what :mod:`fedsim.flwr_private.vce`'s pick-up waits
on (a message for some node was stored), :func:`wait_for_replies` what the
ServerApp's transport (:mod:`fedsim.engine.server.transport`) waits on (a reply
to one of its messages was stored).
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

from flwr.app import Message
from flwr.supercore.date import now

from fedsim.flwr_private import version

if TYPE_CHECKING:
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

#: The module defining Flower's in-memory LinkState.
MODULE = "flwr.server.superlink.linkstate.in_memory_linkstate"
#: Attribute of a LinkState holding ``{node_id: {message_id: None}}`` (ordered).
_INDEX = "_fedsim_pending"
_install_lock = threading.Lock()
_SIGNALS = "_fedsim_signals"
#: Flower's own methods, kept by :func:`install`.
original: dict[str, Any] = {}


class Signals:
    """What a LinkState tells the threads that wait on it.

    ``stored`` counts the messages stored for nodes; ``awaited`` holds the ids
    of messages whose replies a waiter expects, ``replied`` those of them whose
    reply was stored and not yet collected.
    """

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.stored = 0
        self.awaited: set[str] = set()
        self.replied: set[str] = set()


def signals(state: Any) -> Signals:
    """The state's :class:`Signals` (created the first time)."""
    found: Signals | None = state.__dict__.get(_SIGNALS)
    if found is None:
        with _install_lock:
            found = state.__dict__.setdefault(_SIGNALS, Signals())
    return found


def watched(state: Any) -> bool:
    """Whether ``state`` notifies its waiters (an in-memory LinkState whose class
    has this module's methods installed)."""
    method = getattr(type(state), "store_message_res", None)
    return method is store_message_res


def wait_for_messages(state: Any, seen: int, timeout: float) -> None:
    """Wait until more than ``seen`` messages were stored for nodes (see
    :attr:`Signals.stored`), or ``timeout`` seconds passed."""
    signal = signals(state)
    with signal.changed:
        if signal.stored == seen:
            signal.changed.wait(timeout)


def await_replies(state: Any, ids: set[str]) -> None:
    """Track the replies to ``ids`` from now on (a reply stored earlier is not
    seen: pull once after this call)."""
    signal = signals(state)
    with signal.changed:
        signal.awaited |= ids


def wait_for_replies(state: Any, ids: set[str], timeout: float) -> set[str]:
    """Those of ``ids`` (awaited) whose reply was stored since they were last
    returned; waits up to ``timeout`` seconds for one (an empty set when none
    came)."""
    signal = signals(state)
    with signal.changed:
        found = signal.replied & ids
        if not found:
            signal.changed.wait(timeout)
            found = signal.replied & ids
        signal.replied -= found
    return found


def forget_replies(state: Any, ids: set[str]) -> None:
    """Stop tracking the replies to ``ids``."""
    signal = signals(state)
    with signal.changed:
        signal.awaited -= ids
        signal.replied -= ids


def pending_nodes(state: Any) -> list[int]:
    """Nodes with a message stored and not yet delivered (in the index's order:
    their first pending message's)."""
    with state.lock:
        return [node for node, ids in _pending(state).items() if ids]


def _pending(state: InMemoryLinkState) -> dict[int, dict[str, None]]:
    """The state's index, built from its store the first time it is needed."""
    index: dict[int, dict[str, None]] | None = state.__dict__.get(_INDEX)
    if index is None:
        index = {}
        for message_id, message in state.message_ins_store.items():
            if message.metadata.delivered_at == "":
                index.setdefault(message.metadata.dst_node_id, {})[message_id] = None
        state.__dict__[_INDEX] = index
    return index


def store_message_ins(self: InMemoryLinkState, message: Message) -> str | None:
    """Flower's ``store_message_ins``, also indexing the stored message."""
    message_id = original["store_message_ins"](self, message)
    if message_id is not None:
        with self.lock:
            if message_id in self.message_ins_store:
                node = message.metadata.dst_node_id
                _pending(self).setdefault(node, {})[message_id] = None
        signal = signals(self)
        with signal.changed:
            signal.stored += 1
            signal.changed.notify_all()
    return message_id


def store_message_res(self: InMemoryLinkState, message: Message) -> str | None:
    """Flower's ``store_message_res``, also waking whoever waits for the reply."""
    message_id = original["store_message_res"](self, message)
    if message_id is not None:
        signal = signals(self)
        replied = message.metadata.reply_to_message_id
        with signal.changed:
            if replied in signal.awaited:
                signal.replied.add(replied)
                signal.changed.notify_all()
    return message_id


def get_message_ins(
    self: InMemoryLinkState,
    node_id: int,
    limit: int | None,
    *,
    run_id: int | None = None,
) -> list[Message]:
    """Flower's ``get_message_ins`` over the node's pending messages only."""
    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Message] = []
    with self.lock:
        pending = _pending(self).get(node_id)
        if not pending:
            return found
        for message_id in list(pending):
            self._check_stored_messages({message_id})
            message = self.message_ins_store.get(message_id)
            if message is None or message.metadata.delivered_at != "":
                del pending[message_id]
                continue
            if run_id is not None and message.metadata.run_id != run_id:
                continue
            found.append(message)
            if limit and len(found) == limit:
                break
        delivered_at = now().isoformat()
        for message in found:
            message.metadata.delivered_at = delivered_at
            pending.pop(message.metadata.message_id, None)
        if not pending:
            del _pending(self)[node_id]
    return found


#: Flower's methods this module replaces, and their parameters
#: (:func:`fedsim.flwr_private.signatures.contract` gathers them).
PATCHED = {
    f"{MODULE}.InMemoryLinkState.store_message_ins": ("self", "message"),
    f"{MODULE}.InMemoryLinkState.store_message_res": ("self", "message"),
    f"{MODULE}.InMemoryLinkState.get_message_ins": (
        "self",
        "node_id",
        "limit",
        "run_id",
    ),
    f"{MODULE}.InMemoryLinkState._check_stored_messages": (
        "self",
        "message_ids",
        "run_id",
    ),
}
#: What a run loses where the replacement is skipped.
LOSES = "polls Flower's LinkState, O(nodes x messages) a sweep, instead of waking"


def install() -> bool:
    """Replace the three methods (once; idempotent). False, and nothing changed,
    where this process holds no in-memory LinkState, or where Flower's version
    is not the one this module was written against (warning once)."""
    module = sys.modules.get(MODULE)
    if module is None or not version.patchable("linkstate", LOSES):
        return False
    with _install_lock:
        cls: Any = module.InMemoryLinkState
        for name, replacement in (
            ("store_message_ins", store_message_ins),
            ("get_message_ins", get_message_ins),
            ("store_message_res", store_message_res),
        ):
            if getattr(cls, name) is not replacement:
                original[name] = getattr(cls, name)
                setattr(cls, name, replacement)
    return True
