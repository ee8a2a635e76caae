"""The Flower ClientApp: routes messages to the strategy's client algorithm.

Everything heavy (experiment parsing, the dataset and its partitions, the client
algorithm with its model) is built once per client process and cached, so a Ray
actor that simulates many clients over many rounds builds it once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.core import registry
from fedsim.core.config import Experiment, from_run_config
from fedsim.learn.data import FederatedData, federated_data
from fedsim.core.messages import CONFIG, METRICS, PARTITION_ID, SECONDS, SERVER_ROUND
from fedsim.learn.training import derive_seed, resolve_device


class SimulatedClientFailure(RuntimeError):
    """Raised by a client picked to fail this round (``federation.failure-rate``)."""


@dataclass(frozen=True)
class ClientRuntime:
    """What one client process builds once and reuses."""

    experiment: Experiment
    data: FederatedData
    algorithm: Any


@lru_cache(maxsize=2)
def _runtime(items: tuple[tuple[str, Any], ...]) -> ClientRuntime:
    exp = from_run_config(dict(items))
    torch.set_num_threads(exp.resources.num_cpus)
    device = resolve_device(exp.resources)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    algorithm = registry.STRATEGIES[exp.strategy.name].load_client()(
        exp, data.info, device
    )
    return ClientRuntime(exp, data, algorithm)


def runtime(run_config: Mapping[str, Any]) -> ClientRuntime:
    """The cached runtime of this process for a run-config."""
    return _runtime(tuple(sorted(run_config.items())))


def partition_id(context: Context) -> int:
    """The client's partition id, from Flower's node config."""
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


app = ClientApp()


def _handle(msg: Message, context: Context, method: str) -> Message:
    rt = runtime(context.run_config)
    pid = partition_id(context)
    server_round = int(msg.content.config_records[CONFIG][SERVER_ROUND])  # type: ignore[arg-type]
    if method == "train":
        maybe_fail(rt.experiment, server_round, pid)
    start = time.perf_counter()
    reply: RecordDict = getattr(rt.algorithm, method)(
        msg.content,
        rt.data.client(pid),
        server_round=server_round,
        state=context.state,
    )
    metrics = reply.metric_records[METRICS]
    metrics[SECONDS] = time.perf_counter() - start
    metrics[PARTITION_ID] = pid
    return Message(reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training with the strategy's client algorithm."""
    return _handle(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation on the client's local test split."""
    return _handle(msg, context, "evaluate")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node discovery)."""
    pid = partition_id(context)
    return Message(
        RecordDict({METRICS: MetricRecord({PARTITION_ID: pid})}), reply_to=msg
    )
