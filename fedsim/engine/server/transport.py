"""The ServerApp's transport: Flower's Grid, with replies waited on instead of
polled for, and work run while the clients work.

:class:`Transport` forwards Flower's ``Grid`` methods to the grid Flower gave
the ServerApp; :meth:`Transport.send_and_wait` pushes messages and collects
their replies; :meth:`Transport.defer` runs a job (the round driver's closing of
the previous round) once the next messages are out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedsim.flwr_private import linkstate


class ForwardingGrid(Grid):
    """A ``Grid`` that hands every call to the grid it wraps; subclasses
    override what they change."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(
            content, message_type, dst_node_id, group_id, ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class Transport(ForwardingGrid):
    """Delegates to Flower's ``grid``; sends and waits (see module doc)."""

    #: First and largest pause between two polls for replies (seconds).
    POLL_FIRST = 0.001
    POLL_MAX = 0.05

    def __init__(self, grid: Grid):
        super().__init__(grid)
        #: Work to run once the next messages are out (:meth:`defer`).
        self._deferred: Callable[[], None] | None = None

    # -- Flower's Grid: nodes, and sending with the deferred job -----------------
    def get_node_ids(self) -> Iterable[int]:
        return self.connected_node_ids()

    def connected_node_ids(self) -> list[int]:
        """The nodes connected now, as Flower's grid lists them."""
        return list(self.grid.get_node_ids())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = list(self.grid.push_messages(messages))
        self.run_deferred()
        return ids

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.send_and_wait(list(messages), timeout=timeout)

    # -- work done while clients work -------------------------------------------
    def defer(self, job: Callable[[], None]) -> None:
        """Run ``job`` as soon as the next messages are pushed, while their
        clients work, or at :meth:`run_deferred`, whichever comes first (the
        round driver closes a round this way)."""
        if self._deferred is not None:
            raise RuntimeError("the grid holds a deferred job already")
        self._deferred = job

    def run_deferred(self) -> None:
        """Run the deferred job now, if one waits (once)."""
        job, self._deferred = self._deferred, None
        if job is not None:
            job()

    # -- sending -----------------------------------------------------------------
    def send_and_wait(
        self, messages: list[Message], *, timeout: float | None
    ) -> list[Message]:
        """Push ``messages`` and collect their replies until all arrived or
        ``timeout`` passed (in arrival order).

        Flower's grids pause 0.1 s (simulation) to 3 s between polls. In
        simulation (a LinkState that signals its waiters, see
        :mod:`fedsim.flwr_private.linkstate`) this waits for a reply to be
        stored and pulls the replies that came; everywhere else it polls, the
        pause starting at 1 ms and growing 1.5x per empty poll up to 50 ms, back
        to 1 ms whenever a reply arrives. Either way every pending message is
        pulled whenever 50 ms pass without a reply, so expired messages come
        back as errors as they do from Flower's own loop.

        A deferred job (:meth:`defer`) runs once the messages are out; the
        timeout counts from its end.
        """
        state = getattr(self.grid, "state", None)
        watched = state is not None and linkstate.watched(state)
        sent = {i for i in self.grid.push_messages(messages) if i is not None}
        pending = set(sent)
        if watched:
            linkstate.await_replies(state, sent)
        self.run_deferred()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = self.POLL_FIRST
        ready = pending
        try:
            while pending:
                arrived = list(self.grid.pull_messages(ready & pending))
                if arrived:
                    replies.extend(arrived)
                    pending.difference_update(
                        m.metadata.reply_to_message_id for m in arrived
                    )
                    pause = self.POLL_FIRST
                    if not watched:
                        continue
                if not pending or (
                    deadline is not None and time.monotonic() >= deadline
                ):
                    break
                wait = self.POLL_MAX
                if deadline is not None:
                    wait = min(wait, max(deadline - time.monotonic(), 0.0))
                if watched:
                    ready = linkstate.wait_for_replies(state, pending, wait) or pending
                else:
                    time.sleep(min(pause, wait))
                    pause = min(pause * 1.5, self.POLL_MAX)
        finally:
            if watched:
                linkstate.forget_replies(state, sent)
        return replies
