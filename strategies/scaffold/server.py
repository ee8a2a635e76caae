"""SCAFFOLD's server: Flower's ``FedAvg`` sampling and round, with the server
control variate sent down and the paper's update of ``x`` and ``c`` (see
:mod:`fedsim.strategies.scaffold`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, CONTROL, NUM_EXAMPLES
from fedsim.flwr_private import valid_replies
from fedsim.protocol.setup import ServerSetup, with_message_keys
from fedsim.strategies.scaffold.maths import server_update


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class Scaffold(FedAvg):
    """FedAvg's sampling with SCAFFOLD's control variates.

    Parameters
    ----------
    control : mapping of str to ndarray
        The initial server control variate ``c`` (zeros), one array per
        trainable parameter.
    num_clients : int
        ``N``, the federation's clients (``c`` moves by ``|S|/N``).
    server_lr : float
        ``eta_g``.
    **kwargs
        Flower ``FedAvg`` options (sampling fractions, minimum nodes...).
    """

    def __init__(
        self,
        control: Mapping[str, np.ndarray],
        *,
        num_clients: int,
        server_lr: float,
        **kwargs: Any,
    ):
        super().__init__(**with_message_keys(kwargs))
        self.control = {k: np.asarray(v) for k, v in control.items()}
        self.num_clients = num_clients
        self.server_lr = server_lr
        #: The global model ``x`` of the current round.
        self.current: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sample; every message also carries ``c`` under ``control``."""
        self.current = _numpy(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = _record(self.control)
        for msg in messages:
            msg.content[CONTROL] = control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``x += eta_g mean(y_i - x)``, ``c += sum(dc_i) / N`` over the clients
        that trained (``num-examples`` > 0)."""
        valid = valid_replies(self, replies, validate=False)
        trained = [
            m
            for m in valid
            if float(m.content.metric_records["metrics"][NUM_EXAMPLES]) > 0  # type: ignore[arg-type]
        ]
        if not trained:
            return None, None
        delta_y, delta_c = [], []
        for msg in trained:
            y = _numpy(msg.content.array_records[ARRAYS])
            dc = _numpy(msg.content.array_records[CONTROL])
            if set(y) != set(self.current) or set(dc) != set(self.control):
                raise ValueError(
                    f"node {msg.metadata.src_node_id}: SCAFFOLD reply arrays do not "
                    "match the global model and control variate"
                )
            delta_y.append({k: y[k] - self.current[k] for k in self.current})
            delta_c.append(dc)
        new_x, self.control = server_update(
            self.current,
            self.control,
            delta_y,
            delta_c,
            num_clients=self.num_clients,
            server_lr=self.server_lr,
        )
        contents = [msg.content for msg in valid]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return _record(new_x), metrics

    def checkpoint_state(self) -> dict[str, Any]:
        """The server control variate ``c``."""
        return {"control": dict(self.control)}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Put back what :meth:`checkpoint_state` saved."""
        self.control = {k: np.asarray(v) for k, v in state["control"].items()}


def check(experiment: Experiment, model: Any, data: Any) -> None:
    """Option II's control variate ``(x - y_i) / (K eta_l)`` is the mean
    corrected gradient only for plain SGD steps: refuse momentum and Adam."""
    t = experiment.train
    if t.optimizer != "sgd":
        raise ConfigError(
            f"train.optimizer: {t.optimizer!r} does not suit SCAFFOLD, whose option "
            "II control variate assumes plain SGD steps; use 'sgd'"
        )
    if t.momentum != 0:
        raise ConfigError(
            f"train.momentum: {t.momentum:g} does not suit SCAFFOLD, whose option "
            "II control variate assumes plain SGD steps; use 0"
        )


def build(setup: ServerSetup) -> Scaffold:
    """SCAFFOLD over the model's trainable parameters, ``c = 0``."""
    control = {
        k: np.zeros(tuple(p.shape), dtype=p.detach().cpu().numpy().dtype)
        for k, p in setup.model.named_parameters()
        if p.requires_grad
    }
    return Scaffold(
        control,
        num_clients=setup.experiment.federation.clients,
        server_lr=setup.options.server_lr,
        **setup.fedavg_options(),
    )
