"""Flower's in-memory LinkState with pending messages indexed by destination node.

In simulation, Flower 1.41's runtime asks the LinkState for every node's next
message every 0.1 s (``vce_api.add_messages_to_queue``), and
``InMemoryLinkState.get_message_ins`` validates every stored message for every
node it is asked about: O(nodes x messages) per sweep. With 1,000 nodes and a
round's 100 messages in flight the sweep never rests: py-spy put 88 % of the
simulation process's samples there, a whole core taken from the clients.

:func:`install` (called when the ServerApp is imported, i.e. in the process
that runs the simulation runtime) replaces two methods of that class:

- ``store_message_ins`` stores as before and also records the message id under
  its destination node;
- ``get_message_ins`` reads only that node's pending ids, validates those
  (expiry, federation: Flower's own ``_check_stored_messages``) and returns the
  same messages, in the same order, marked delivered as before.

The one difference: Flower's query also deleted *other* nodes' expired messages
as a side effect; here they are deleted when their own node asks, or when the
server pulls their replies (``get_message_res`` checks them too). The SQL
LinkState and every other method are untouched. The replacement is installed
only on the Flower version it was written against (1.41), and only in a process
that already holds Flower's in-memory LinkState (the simulation runtime's): the
module that defines it pulls in the SuperLink's database stack (about 1 s of
imports) that a deployed ServerApp does not need.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

import flwr
from flwr.app import Message
from flwr.supercore.date import now

if TYPE_CHECKING:
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

#: The module defining Flower's in-memory LinkState.
MODULE = "flwr.server.superlink.linkstate.in_memory_linkstate"
#: Attribute of a LinkState holding ``{node_id: {message_id: None}}`` (ordered).
_INDEX = "_fedsim_pending"
_install_lock = threading.Lock()
#: Flower's own methods, kept by :func:`install`.
original: dict[str, Any] = {}


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
    return found


def supported(version: str | None = None) -> bool:
    """Whether this replacement was written for the installed Flower."""
    return (version or flwr.__version__).startswith("1.41.")


def install() -> bool:
    """Replace the two methods (once; idempotent). False, and nothing changed,
    where Flower's version is not the one this module was written against or
    this process holds no in-memory LinkState."""
    module = sys.modules.get(MODULE)
    if not supported() or module is None:
        return False
    with _install_lock:
        cls: Any = module.InMemoryLinkState
        for name, replacement in (
            ("store_message_ins", store_message_ins),
            ("get_message_ins", get_message_ins),
        ):
            if getattr(cls, name) is not replacement:
                original[name] = getattr(cls, name)
                setattr(cls, name, replacement)
    return True
