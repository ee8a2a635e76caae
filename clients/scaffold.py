"""SCAFFOLD's client (Karimireddy et al. 2020, option II; see
:mod:`fedsim.strategies.scaffold`): local SGD on the corrected gradient
``g_i(y) - c_i + c``, then ``c_i+ = c_i - c + (x - y_i) / (K eta_l)``; the
client's control variate ``c_i`` is kept in its ``context.state``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsim.clients.full import FullModelClient, fit_round, train_metrics
from fedsim.core.messages import CONTROL, METRICS
from fedsim.learn.data import ClientData
from fedsim.learn.training import Penalty

#: Key of the client's control variate ``c_i`` in its ``context.state``.
STATE_KEY = "scaffold-control"

Arrays = Mapping[str, np.ndarray]


def client_control(
    c_i: Arrays, c: Arrays, x: Arrays, y: Arrays, *, steps: int, lr: float
) -> dict[str, np.ndarray]:
    """Option II: ``c_i+ = c_i - c + (x - y_i) / (K eta_l)``, ``K`` local
    steps of size ``eta_l`` from the global model ``x`` to ``y_i``."""
    if steps <= 0 or lr <= 0:
        raise ValueError(f"need steps > 0 and lr > 0, got {steps}, {lr}")
    return {
        k: (c_i[k] - c[k] + (x[k] - y[k]) / (steps * lr)).astype(c_i[k].dtype)
        for k in c_i
    }


def correction(params: Mapping[str, torch.nn.Parameter], d: Arrays) -> Penalty:
    """``penalty()`` = ``sum <p, d_p>``: its gradient is ``d`` (= ``c - c_i``),
    so each step descends the corrected gradient ``g_i - c_i + c``."""
    shift = {
        k: torch.from_numpy(np.asarray(d[k])).to(p.device) for k, p in params.items()
    }

    def penalty() -> torch.Tensor:
        return sum((p * shift[k]).sum() for k, p in params.items())  # type: ignore[return-value]

    return penalty


def _record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class ScaffoldClient(FullModelClient):
    """SCAFFOLD's local training from the received global model ``x`` and
    control variate ``c``.

    Message contract (see :mod:`fedsim.strategies.scaffold`): receives
    ``arrays`` (``x``) and ``control`` (``c``, the trainable parameters);
    replies ``arrays`` (the local model ``y_i``), ``control`` (``c_i+ - c_i``)
    and ``metrics`` (``loss``, ``num-examples``). A client that took no step
    (e.g. DP-SGD budget spent) keeps ``c_i`` and replies a zero update with
    ``num-examples`` 0.
    """

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """One round of corrected local SGD; updates ``c_i`` in ``state``."""
        exp = self.experiment
        self.load(content, state)
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        x = {k: p.detach().cpu().numpy().copy() for k, p in params.items()}
        c = {k: v.numpy() for k, v in content.array_records[CONTROL].items()}
        if set(c) != set(params):
            odd = sorted(set(c) ^ set(params))[:3]
            raise KeyError(
                f"SCAFFOLD: the server's control variate and the model's trainable "
                f"parameters differ in {odd}"
            )
        c_i = (
            {k: v.numpy() for k, v in state.array_records[STATE_KEY].items()}
            if STATE_KEY in state.array_records
            else {k: np.zeros_like(v) for k, v in x.items()}
        )
        stats, extra = fit_round(
            self.model,
            data,
            exp,
            server_round=server_round,
            device=self.device,
            state=state,
            penalty=correction(params, {k: c[k] - c_i[k] for k in params}),
        )
        if stats.steps > 0:
            y = {k: p.detach().cpu().numpy() for k, p in params.items()}
            new = client_control(c_i, c, x, y, steps=stats.steps, lr=exp.train.lr)
        else:
            new = c_i
        state[STATE_KEY] = _record(new)
        reply = self.keep(state)
        reply[CONTROL] = _record({k: new[k] - c_i[k] for k in new})
        reply[METRICS] = MetricRecord(train_metrics(stats, data, extra))
        return reply
