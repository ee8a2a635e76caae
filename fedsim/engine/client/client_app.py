"""The Flower ClientApp: routes messages to the family's client algorithm.

``train`` and ``evaluate`` go to the algorithm's methods of those names; a
family's custom action ``train.<action>`` (declared in ``Family.actions``) to
its method ``<action>``: the client contract is
:class:`fedsim.protocol.contract.ClientAlgorithm`. Everything heavy (experiment
parsing, the dataset and its partitions, the client algorithm with its model) is
built once per client process and cached, so a Ray actor that simulates many
clients over many rounds builds it once. Importing the module makes Flower's
``Array.numpy`` skip ``np.load``'s header parse (:mod:`fedsim.flwr_private.arrays`).

A client's ``context.state`` is saved to the run directory after each reply and
loaded back once in a resumed run (:mod:`fedsim.engine.client.client_state`): by the
simulation process in simulation, here in deployment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedsim.core import registry
from fedsim.core.experiment import Experiment
from fedsim.core.loading import RESUME_KEY, RUN_DIR_KEY, SWEEP_KEY, from_run_config
from fedsim.core.messages import (
    CONFIG,
    EXPERIMENT,
    METRICS,
    PARTITION_ID,
    SECONDS,
    SERVER_ROUND,
)
from fedsim.core.seeding import derive_seed
from fedsim.engine.client.client_state import RELAYED, ClientStateStore
from fedsim.flwr_private import arrays
from fedsim.learn.data import FederatedData
from fedsim.learn.device import resolve_device
from fedsim.learn.tasks import task_data
from fedsim.protocol import contract


class SimulatedClientFailure(RuntimeError):
    """Raised by a client picked to fail this round (``federation.failure-rate``)."""


@dataclass(frozen=True)
class ClientRuntime:
    """What one client process builds once and reuses."""

    experiment: Experiment
    data: FederatedData
    algorithm: contract.ClientAlgorithm


@lru_cache(maxsize=2)
def _runtime(items: tuple[tuple[str, Any], ...]) -> ClientRuntime:
    exp = from_run_config(dict(items))
    torch.set_num_threads(exp.resources.num_cpus)
    device = resolve_device(exp.resources)
    data = task_data(exp)
    algorithm = registry.family(exp.strategy.name).load_client()(exp, data.info, device)
    return ClientRuntime(exp, data, algorithm)


def runtime(run_config: Mapping[str, Any]) -> ClientRuntime:
    """The cached runtime of this process for a run-config."""
    return _runtime(tuple(sorted(run_config.items())))


@lru_cache(maxsize=2)
def _sweep(text: str) -> tuple[dict[str, Any], ...]:
    return tuple(entry["config"] for entry in json.loads(text))


#: Key in a node's state naming the sweep experiment the state belongs to.
_STATE_OWNER = "fedsim-sweep"


def experiment_config(
    run_config: Mapping[str, Any], config: Mapping[str, Any], state: RecordDict
) -> Mapping[str, Any]:
    """The run-config of the experiment a message belongs to.

    In a sweep (one Flower run, its experiments one after another) the message's
    ``config`` names the experiment; a node's state belongs to one experiment
    and is cleared when the next one reaches the node, so no private state
    (e.g. a DP-SGD accountant) leaks from one experiment into another.
    """
    if SWEEP_KEY not in run_config:
        return run_config
    index = int(config[EXPERIMENT])
    owner = state.config_records.get(_STATE_OWNER)
    if owner is None or int(owner["index"]) != index:  # type: ignore[arg-type]
        state.clear()
        state[_STATE_OWNER] = ConfigRecord({"index": index})
    return _sweep(str(run_config[SWEEP_KEY]))[index]


def state_store(config: Mapping[str, Any]) -> ClientStateStore | None:
    """The client-state store of the run directory in an experiment's
    run-config, where this process sees that directory (see
    :mod:`fedsim.engine.client.client_state` for the deployment caveat)."""
    run_dir = str(config.get(RUN_DIR_KEY, ""))
    if not run_dir or not Path(run_dir).is_dir():
        return None
    return ClientStateStore(Path(run_dir))


def partition_id(context: Context, config: Mapping[str, Any]) -> int:
    """The client's partition id: the one the server assigned in the message's
    ``config`` (simulation), else Flower's node config (deployment)."""
    if PARTITION_ID in config:
        return int(config[PARTITION_ID])
    try:
        return int(context.node_config[PARTITION_ID])
    except KeyError:
        raise KeyError(
            "node config lacks 'partition-id'; start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None


def maybe_fail(exp: Experiment, server_round: int, pid: int) -> None:
    """Fail with probability ``federation.failure-rate``, reproducibly."""
    rate = exp.federation.failure_rate
    if rate > 0:
        rng = np.random.default_rng(derive_seed(exp.seed, "failure", server_round, pid))
        if rng.random() < rate:
            raise SimulatedClientFailure(
                f"client {pid} dropped out of round {server_round} (simulated)"
            )


arrays.install()
app = ClientApp()


def _handle(msg: Message, context: Context) -> Message:
    relayed = RELAYED in context.state  # the simulation process keeps the state
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    run_config = experiment_config(context.run_config, config, context.state)
    rt = runtime(run_config)
    pid = partition_id(context, config)
    store = None if relayed else state_store(run_config)
    if store is not None and run_config.get(RESUME_KEY):
        store.restore_into(pid, context.state)
    category, _, action = msg.metadata.message_type.partition(".")
    server_round = int(config.get(SERVER_ROUND, 0))  # type: ignore[arg-type]
    family = registry.family(rt.experiment.strategy.name)
    if action:
        declared = family.actions
        if action not in declared:
            raise ValueError(
                f"strategy {rt.experiment.strategy.name!r} declares no client action "
                f"{action!r} (declared: {', '.join(declared) or 'none'})"
            )
    if category == MessageType.TRAIN and not action:
        maybe_fail(rt.experiment, server_round, pid)
    start = time.perf_counter()
    method = contract.client_method(rt.algorithm, family, action or category)
    reply = method(
        msg.content,
        rt.data.client(pid),
        server_round=server_round,
        state=context.state,
    )
    metrics = reply.metric_records.get(METRICS)
    if metrics is None:
        metrics = reply[METRICS] = MetricRecord()
    metrics[SECONDS] = time.perf_counter() - start
    metrics[PARTITION_ID] = pid
    if store is not None:
        store.save(pid, server_round, context.state)
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training with the family's client algorithm."""
    return _handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation on the client's local test split."""
    return _handle(msg, context)


def _register_actions() -> None:
    """Route every declared custom action (``train.<action>``) to ``_handle``."""
    actions = {a for family in registry.families().values() for a in family.actions}
    for action in sorted(actions):
        app.train(action)(_handle)


_register_actions()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node discovery)."""
    pid = partition_id(context, {})
    return Message(
        RecordDict({METRICS: MetricRecord({PARTITION_ID: pid})}), reply_to=msg
    )
