"""Split learning's client side: SplitFed (V1 and V2) and U-shaped.

See :mod:`fedsim.strategies.split` for the protocols and the message contract. Between
messages the client keeps no autograd graph and nothing in the process: its
segment weights, optimiser state and cursor (round, batch, loss so far) live in
``context.state``; the reply that applies batch t's gradient recomputes batch
t's forward under the same seed (same dropout masks), steps, and carries batch
t+1's activations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.core.experiment import Experiment
from fedsim.core.messages import (
    ACTIVATIONS,
    ARRAYS,
    BATCHES,
    CUT,
    GRADIENT,
    LABELS,
    METRICS,
    NUM_EXAMPLES,
)
from fedsim.core.seeding import derive_seed
from fedsim.learn.amaq import Amaq
from fedsim.learn.anneal import Annealed
from fedsim.learn.base import build_model
from fedsim.learn.codecs import CODECS, decode, encode
from fedsim.learn.data import ClientData, DatasetInfo
from fedsim.learn.hf_split import prepare
from fedsim.learn.split import (
    Segment,
    batch_plan,
    context_arrays,
    cut_points,
    cut_tensor,
    from_record,
    load_optimizer,
    optimizer_arrays,
    received,
    seeded,
    split_model,
    to_record,
)
from fedsim.learn.tasks import task_for
from fedsim.learn.training import make_optimizer

#: ``context.state`` keys: the client's segment weights, its optimiser state,
#: and its cursor (``round``, ``batch``, ``loss-sum``, ``seen``; with AMAQ
#: ``bits-sum`` and ``bits-n``), kept for one round.
WEIGHTS, OPTIMIZER, CURSOR = "split.weights", "split.optimizer", "split.cursor"
#: ``context.state`` key of an adaptive codec's learner (AMAQ's gate), kept
#: across rounds.
CODEC = "split.codec"
#: Metric of the last reply: mean bit width of the activations sent (AMAQ).
MEAN_BITS = "mean-bits"


class SplitClient:
    """SplitFed's client: runs the segment before the cut.

    Parameters
    ----------
    experiment : Experiment
        The run's configuration (``[split]`` in ``experiment.strategy.options``).
    info : DatasetInfo
        Input shape and classes, to build the model.
    device : torch.device
        Where the model lives and trains.
    """

    #: Whether the labels go up with the activations (SplitFed: the server
    #: computes the loss).
    sends_labels = True

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        self.experiment = experiment
        self.options = experiment.strategy.options
        self.device = device
        built = build_model(experiment.model, info, experiment.seed)
        self.model = prepare(built, experiment).to(device)
        self.task = task_for(experiment)
        cuts = cut_points(
            self.model, self.options.cut, getattr(self.options, "tail", None)
        )
        self.segments = split_model(self.model, cuts)
        self.codec = CODECS[self.options.quantization](self.options)

    # -- segments and state -------------------------------------------------------
    def own(self) -> list[Segment]:
        """The segments the client holds (SplitFed: the first)."""
        return self.segments[:1]

    def own_state(self) -> dict[str, torch.Tensor]:
        """The weights of the client's segments (CPU copies)."""
        return {k: v for s in self.own() for k, v in s.state().items()}

    def load_own(self, arrays: dict[str, torch.Tensor]) -> None:
        for segment in self.own():
            segment.load({k: v for k, v in arrays.items() if segment.owns(k)})

    def optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimiser over the client's segments (``[train]``)."""
        params = [p for s in self.own() for p in s.parameters()]
        return make_optimizer(params, self.experiment.train)

    def restore(
        self, state: RecordDict
    ) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
        """Weights, optimiser and cursor from ``context.state``."""
        if CURSOR not in state:
            raise RuntimeError("a split step arrived before the round's train message")
        self.load_own(state.array_records[WEIGHTS].to_torch_state_dict())
        optimizer = self.optimizer()
        load_optimizer(optimizer, state.array_records[OPTIMIZER].to_torch_state_dict())
        cursor = dict(state.config_records[CURSOR])
        self.restore_codec(state, int(cursor["round"]))
        return optimizer, cursor

    def restore_codec(self, state: RecordDict, server_round: int) -> None:
        """An adaptive codec's learner (AMAQ's gate) from ``context.state``; a
        scheduled codec (``anneal``) at ``server_round``'s bit width."""
        if isinstance(self.codec, Annealed):
            self.codec.at_round(server_round, self.experiment.rounds)
        if isinstance(self.codec, Amaq):
            record = state.array_records[CODEC] if CODEC in state else ArrayRecord()
            self.codec.load(record.to_torch_state_dict())

    def save(
        self,
        state: RecordDict,
        optimizer: torch.optim.Optimizer,
        cursor: dict[str, Any],
    ) -> None:
        state[WEIGHTS] = ArrayRecord(self.own_state())
        state[OPTIMIZER] = ArrayRecord(optimizer_arrays(optimizer))
        state[CURSOR] = ConfigRecord(cursor)
        self.save_codec(state)

    def save_codec(self, state: RecordDict) -> None:
        """An adaptive codec's learner into ``context.state`` (across rounds)."""
        if isinstance(self.codec, Amaq):
            state[CODEC] = ArrayRecord(self.codec.state())

    def backward_cut(
        self, out: torch.Tensor, gradient: torch.Tensor, progress: float
    ) -> None:
        """Backpropagate the received gradient of the cut activations; an
        adaptive codec (AMAQ) also learns its bit widths (``progress``: the
        run's fraction done, for its annealed budget)."""
        if isinstance(self.codec, Amaq):
            self.codec.backward(out, gradient, progress=progress)
        else:
            out.backward(gradient)

    @staticmethod
    def tally_bits(reply: RecordDict, cursor: dict[str, Any]) -> None:
        """Add the mean bit width of the activations in ``reply`` (codecs that
        send per-channel ``bits``) to the round's tally in ``cursor``."""
        bits = f"{ACTIVATIONS}.bits"
        if CUT in reply and bits in reply.array_records[CUT]:
            values = reply.array_records[CUT][bits].numpy()
            cursor["bits-sum"] = float(cursor.get("bits-sum", 0.0)) + float(
                values.mean()
            )
            cursor["bits-n"] = int(cursor.get("bits-n", 0)) + 1

    # -- batches ------------------------------------------------------------------
    def plan(
        self, data: ClientData, server_round: int, cursor: dict[str, Any]
    ) -> list[np.ndarray]:
        """This round's batches (``train.epochs`` shuffled passes)."""
        exp = self.experiment
        seed = derive_seed(exp.seed, "train", server_round, data.partition_id)
        return batch_plan(
            len(data.train), exp.train.batch_size, exp.train.epochs, seed=seed
        )

    def head_output(
        self, data: ClientData, server_round: int, batch: np.ndarray, t: int
    ) -> Any:
        """The first segment's output on batch ``t`` (dropout seeded by run,
        round, partition and batch, so a recomputation is the same)."""
        seed = derive_seed(
            self.experiment.seed, "split-forward", server_round, data.partition_id, t
        )
        x = torch.from_numpy(data.train.x[batch]).to(self.device)
        self.model.train()
        with seeded(seed, self.device):
            return self.segments[0](x)

    def upload(
        self, data: ClientData, server_round: int, plan: list[np.ndarray], t: int
    ) -> RecordDict:
        """The message carrying batch ``t``'s activations (their context, and
        the task's targets: the labels, a causal LM's tokens)."""
        with torch.no_grad():
            out = self.head_output(data, server_round, plan[t], t)
        arrays = encode(self.codec, ACTIVATIONS, cut_tensor(out).cpu().numpy())
        arrays.update(context_arrays(out))
        if self.sends_labels:
            arrays[LABELS] = self.targets(data, plan[t]).cpu().numpy()
        return RecordDict(
            {CUT: to_record(arrays), METRICS: MetricRecord({BATCHES: len(plan)})}
        )

    def targets(self, data: ClientData, batch: np.ndarray) -> torch.Tensor:
        """What the loss of ``batch`` needs besides the logits (the task's)."""
        x = torch.from_numpy(data.train.x[batch]).to(self.device)
        y = torch.from_numpy(data.train.y[batch]).to(self.device)
        return self.task.targets(x, y)

    def final(
        self, plan: list[np.ndarray], data: ClientData, cursor: dict[str, Any]
    ) -> RecordDict:
        """The last reply of the round: the client's segments and its weight."""
        metrics: dict[str, float] = {NUM_EXAMPLES: len(data.train), BATCHES: len(plan)}
        if cursor.get("bits-n"):
            metrics[MEAN_BITS] = float(cursor["bits-sum"]) / int(cursor["bits-n"])
        return RecordDict(
            {ARRAYS: ArrayRecord(self.own_state()), METRICS: MetricRecord(metrics)}
        )

    # -- messages -----------------------------------------------------------------
    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Start the round: load the received segment(s), reply batch 0."""
        self.load_own(content.array_records[ARRAYS].to_torch_state_dict())
        cursor = {"round": server_round, "batch": 0, "loss-sum": 0.0, "seen": 0}
        return self.begin(data, server_round, state, cursor)

    def begin(
        self,
        data: ClientData,
        server_round: int,
        state: RecordDict,
        cursor: dict[str, Any],
    ) -> RecordDict:
        """Open the round's batches: reply batch 0 (the weights are loaded)."""
        self.restore_codec(state, server_round)
        plan = self.plan(data, server_round, cursor)
        if not plan:
            return self.final(plan, data, cursor)
        reply = self.upload(data, server_round, plan, 0)
        self.tally_bits(reply, cursor)
        self.save(state, self.optimizer(), cursor)
        return reply

    def split_step(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Apply the gradient of batch t's cut activations, step, reply batch
        t+1's activations (or, after the last batch, the client's segments)."""
        optimizer, cursor = self.restore(state)
        plan = self.plan(data, server_round, cursor)
        t = int(cursor["batch"])
        gradient = decode(self.codec, GRADIENT, from_record(content.array_records[CUT]))
        optimizer.zero_grad(set_to_none=True)
        out = self.head_output(data, server_round, plan[t], t)
        progress = (server_round - 1 + (t + 1) / len(plan)) / self.experiment.rounds
        self.backward_cut(
            cut_tensor(out), torch.from_numpy(gradient).to(self.device), progress
        )
        optimizer.step()
        cursor["batch"] = t + 1
        if t + 1 == len(plan):
            for key in (WEIGHTS, OPTIMIZER, CURSOR):
                del state[key]
            self.save_codec(state)
            return self.final(plan, data, cursor)
        reply = self.upload(data, server_round, plan, t + 1)
        self.tally_bits(reply, cursor)
        self.save(state, optimizer, cursor)
        return reply


class UshapeClient(SplitClient):
    """U-shaped: the client holds the head and the tail with the loss; labels
    and inputs stay here. ``split_tail`` runs the tail on the body's output."""

    sends_labels = False

    def own(self) -> list[Segment]:
        return [self.segments[0], self.segments[-1]]

    def final(
        self, plan: list[np.ndarray], data: ClientData, cursor: dict[str, Any]
    ) -> RecordDict:
        reply = super().final(plan, data, cursor)
        seen = int(cursor["seen"])
        reply[METRICS]["loss"] = (
            float(cursor["loss-sum"]) / seen if seen else float("nan")
        )
        return reply

    def split_tail(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Tail forward on the body's output for batch t, the loss with the local
        labels, backward, step the tail; reply the gradient of the body's output."""
        optimizer, cursor = self.restore(state)
        plan = self.plan(data, server_round, cursor)
        t = int(cursor["batch"])
        cut = from_record(content.array_records[CUT])
        body = decode(self.codec, ACTIVATIONS, cut)
        h = torch.from_numpy(body).to(self.device).requires_grad_(True)
        targets = self.targets(data, plan[t])
        seed = derive_seed(
            self.experiment.seed, "split-tail", server_round, data.partition_id, t
        )
        optimizer.zero_grad(set_to_none=True)
        self.model.train()
        with seeded(seed, self.device):
            loss = self.task.logits_loss(self.segments[-1](received(cut, h)), targets)
        loss.backward()
        optimizer.step()
        n = len(plan[t])
        cursor["loss-sum"] = float(cursor["loss-sum"]) + float(loss.detach()) * n
        cursor["seen"] = int(cursor["seen"]) + n
        self.save(state, optimizer, cursor)
        assert h.grad is not None
        arrays = encode(self.codec, GRADIENT, h.grad.cpu().numpy())
        return RecordDict({CUT: to_record(arrays)})
