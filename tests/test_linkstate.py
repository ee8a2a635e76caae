"""The indexed ``get_message_ins`` against Flower's own, on twin LinkStates.

Both states are built as Flower's simulation builds its in-memory one (a run,
nodes registered by ``vce_api._register_nodes``, messages pushed through
``InMemoryGrid``) and receive the same random sequence of pushes, queries,
expiries and deletions; every query must return the same messages in the same
order, marked delivered the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from simulation_state import RUN, identity, simulation_state  # noqa: F401

from fedsim.flwr_private import linkstate, version


def test_installed_where_the_server_app_runs():
    import fedsim.engine.server.server_app  # noqa: F401

    assert linkstate.install()
    assert version.supported()
    assert InMemoryLinkState.get_message_ins is linkstate.get_message_ins
    assert InMemoryLinkState.store_message_ins is linkstate.store_message_ins
    assert not version.supported("1.42.0")


@pytest.mark.parametrize("seed", range(6))
def test_same_messages_as_flowers_query(seed):
    linkstate.install()
    rng = np.random.default_rng(seed)
    ours, flowers = simulation_state(12), simulation_state(12)
    nodes = ours[2]
    assert nodes != flowers[2]  # node ids are random: address nodes by position
    pushed: tuple[list[str], list[str]] = ([], [])

    def get(which: int, state: InMemoryLinkState, node: int, limit, run_id):
        flowers_query = linkstate.original["get_message_ins"]
        query = linkstate.get_message_ins if which == 0 else flowers_query
        got = query(state, node, limit, run_id=run_id)
        return [pushed[which].index(m.metadata.message_id) for m in got], got

    for _ in range(120):
        op = rng.choice(["push", "get", "get", "expire", "delete"])
        position = int(rng.integers(len(nodes)))
        if op == "push":
            count = int(rng.integers(1, 4))
            for which, (_, grid, ids) in enumerate((ours, flowers)):
                batch = [
                    Message(
                        RecordDict(), dst_node_id=ids[position], message_type="train"
                    )
                    for _ in range(count)
                ]
                pushed[which].extend(grid.push_messages(batch))
        elif op == "get":
            limit = [None, 1, 2][int(rng.integers(3))]
            run_id = [None, RUN, RUN + 1][int(rng.integers(3))]
            a, got_a = get(0, ours[0], ours[2][position], limit, run_id)
            b, got_b = get(1, flowers[0], flowers[2][position], limit, run_id)
            assert a == b
            assert all(m.metadata.delivered_at != "" for m in got_a + got_b)
        elif op == "expire" and pushed[0]:
            index = int(rng.integers(len(pushed[0])))
            for which, (state, _, _) in enumerate((ours, flowers)):
                message = state.message_ins_store.get(pushed[which][index])
                if message is not None:
                    message.metadata.created_at -= message.metadata.ttl + 1
        elif op == "delete" and pushed[0]:
            index = int(rng.integers(len(pushed[0])))
            for which, (state, _, _) in enumerate((ours, flowers)):
                state.delete_messages({pushed[which][index]})
    # Drain every node: nothing pending is lost or returned twice.
    for position in range(len(nodes)):
        a, _ = get(0, ours[0], ours[2][position], None, None)
        b, _ = get(1, flowers[0], flowers[2][position], None, None)
        assert a == b


def test_index_built_from_messages_stored_before_install(monkeypatch):
    linkstate.install()
    monkeypatch.setattr(
        InMemoryLinkState, "store_message_ins", linkstate.original["store_message_ins"]
    )
    state, grid, nodes = simulation_state(3)
    ids = list(
        grid.push_messages(
            [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
        )
    )
    got = linkstate.get_message_ins(state, nodes[1], None)
    assert [m.metadata.message_id for m in got] == [ids[1]]
    assert linkstate.get_message_ins(state, nodes[1], None) == []


def test_sweep_over_many_nodes_is_linear():
    """The point of the index: a sweep over 1,000 nodes with 100 messages in
    flight reads each node's own messages only (Flower's query validated all
    100 for every node: 100,000 checks)."""
    linkstate.install()
    state, grid, nodes = simulation_state(1000)
    grid.push_messages(
        [
            Message(RecordDict(), dst_node_id=nodes[7 * i], message_type="train")
            for i in range(100)
        ]
    )
    checks = 0
    original = state._check_stored_messages

    def counting(ids, run_id=None):
        nonlocal checks
        checks += len(ids)
        return original(ids, run_id)

    state._check_stored_messages = counting
    delivered = sum(len(state.get_message_ins(node_id=n, limit=1)) for n in nodes)
    assert delivered == 100
    assert checks == 100
