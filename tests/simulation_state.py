"""An in-memory LinkState and grid built as Flower's simulation runtime builds
them (a run, nodes registered by ``vce_api._register_nodes``, messages pushed
through ``InMemoryGrid``), for the tests of what fedsim changes in that runtime."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import (
    FLWR_IN_MEMORY_DB_NAME,
    NoOpFederationManager,
    ObjectStoreFactory,
    _register_nodes,
)
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import (
    InMemoryLinkState,
    RunRecord,
)
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

RUN, TASK = 7, 11


@pytest.fixture(autouse=True)
def identity():
    """Messages built here come from the SuperLink's ServerApp task, as in a run."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id = RUN, SUPERLINK_NODE_ID
    TaskIdentity.task_id = TASK
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def simulation_state(nodes: int) -> tuple[InMemoryLinkState, InMemoryGrid, list[int]]:
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run = dataclasses.replace(
        Run.create_empty(run_id=RUN),
        primary_task_id=TASK,
        federation_id=NOOP_FEDERATION_ID,
    )
    state.run_ids[RUN] = RunRecord(run=run)
    state.task_store[TASK] = Task(task_id=TASK, run_id=RUN)
    node_ids = list(_register_nodes(nodes, factory))
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return state, grid, node_ids
