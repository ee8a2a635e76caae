"""The quickstart workload as a plain Flower 1.41 App (message API, stock FedAvg).

What a Flower user writes for the benchmark's workload without fedsim: digits,
``num-supernodes`` clients with Dirichlet(0.5) label skew (flwr-datasets), a small
CNN, Adam, FedAvg with server-side evaluation after every round. The data and
the model definition are fedsim's (``fedsim.learn``), so both sides train the
same network on the same partitions; everything else (loading, the loop, the
strategy) is plain PyTorch and Flower. The server writes a timestamp per round
to ``timings-file`` (run-config) for the benchmark's breakdown.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedsim.core.experiment import DataConfig, ModelConfig
from fedsim.learn.data import DatasetInfo, federated_data
from fedsim.learn.models import build_architecture

INFO = DatasetInfo((1, 8, 8), 10)
_cache: dict[str, Any] = {}


def data(num_partitions: int) -> Any:
    """The partitions, built once per process (the usual Flower pattern)."""
    if "data" not in _cache:
        _cache["data"] = federated_data(
            DataConfig(dataset="digits", partitioner="dirichlet", alpha=0.5),
            num_partitions,
            0,
        )
    return _cache["data"]


def model() -> torch.nn.Module:
    return build_architecture(ModelConfig(name="cnn"), INFO, 0)


def batches(x: np.ndarray, y: np.ndarray, size: int, shuffle: bool) -> Any:
    order = np.random.permutation(len(y)) if shuffle else np.arange(len(y))
    for i in range(0, len(y), size):
        rows = order[i : i + size]
        yield torch.from_numpy(x[rows]), torch.from_numpy(y[rows])


def test(net: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    net.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for xb, yb in batches(x, y, 256, False):
            out = net(xb)
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += float((out.argmax(1) == yb).sum())
    return loss / len(y), correct / len(y)


client = ClientApp()


def _partition(context: Context) -> Any:
    torch.set_num_threads(1)
    cfg = context.node_config
    return data(int(cfg["num-partitions"])).client(int(cfg["partition-id"]))


@client.train()
def train(msg: Message, context: Context) -> Message:
    part = _partition(context).train
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=float(context.run_config["lr"]))
    net.train()
    size = int(context.run_config["batch-size"])
    for _ in range(int(context.run_config["epochs"])):
        for xb, yb in batches(part.x, part.y, size, True):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(net.state_dict()),
            "metrics": MetricRecord({"num-examples": len(part.y)}),
        }
    )
    return Message(content=content, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    part = _partition(context).test
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = test(net, part.x, part.y)
    metrics = {"loss": loss, "accuracy": accuracy, "num-examples": len(part.y)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    rounds = int(context.run_config["rounds"])
    net = model()
    test_set = data(int(context.run_config["clients"])).test
    stamps: list[float] = []
    accuracy: list[float] = []

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = test(net, test_set.x, test_set.y)
        stamps.append(time.time())
        accuracy.append(acc)
        return MetricRecord({"loss": loss, "accuracy": acc})

    FedAvg(fraction_train=1.0, fraction_evaluate=1.0).start(
        grid=grid,
        initial_arrays=ArrayRecord(net.state_dict()),
        num_rounds=rounds,
        evaluate_fn=central,
    )
    with open(str(context.run_config["timings-file"]), "w") as fh:
        json.dump({"round_end": stamps, "accuracy": accuracy}, fh)
