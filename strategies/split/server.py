"""Split learning's server side (see :mod:`fedsim.strategies.split` for the protocols
and the message contract).

:class:`SplitStrategy` runs a round as sessions, one per sampled client: the
``train`` exchange sends every client its segment(s), then each reply is
answered by its :class:`Session` until the client's last reply carries its
segment weights. SplitFed V1 and U-shaped serve all sessions together (one
exchange per step, every active client in it); V2 serves them one after another.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedsim.core.errors import ConfigError, RoundFailed
from fedsim.core.experiment import Experiment
from fedsim.core.messages import (
    ACTIVATIONS,
    ARRAYS,
    CUT,
    GRADIENT,
    LABELS,
    METRICS,
    NUM_EXAMPLES,
    SPLIT_STEP,
    SPLIT_TAIL,
)
from fedsim.core.seeding import derive_seed
from fedsim.learn import hf_split
from fedsim.learn.codecs import CODECS, Codec, decode, encode
from fedsim.learn.split import (
    Segment,
    cut_points,
    from_record,
    split_model,
    to_record,
)
from fedsim.learn.tasks import task_for
from fedsim.protocol.rounds import exchange
from fedsim.protocol.setup import ServerSetup
from fedsim.strategies.split.maths import serving_order, weighted_average
from fedsim.strategies.split.segment import ServerSegment


def cuts(model: nn.Module, options: Any) -> list[int]:
    """Where the family's options cut ``model`` (see
    :func:`fedsim.learn.split.cut_points`)."""
    return cut_points(model, options.cut, getattr(options, "tail", None))


def check(experiment: Experiment, model: nn.Module, data: Any) -> None:
    """Pre-run check: the cuts exist in this model and leave every side a
    stage; LoRA and Hugging Face limits (:func:`fedsim.learn.hf_split.check`).
    ConfigError before anything is written."""
    options = experiment.strategy.options
    cuts(model, options)
    hf_split.check(experiment, model)
    if options.min_bits >= options.max_bits:
        raise ConfigError(
            f"split.min-bits: {options.min_bits} must be < split.max-bits "
            f"({options.max_bits})"
        )


class Session:
    """One SplitFed client's round on the server: each batch's activations and
    labels in, the gradient of the cut activations out."""

    def __init__(self, server: ServerSegment, codec: Codec):
        self.server = server
        self.codec = codec
        self.loss_sum = 0.0
        self.examples = 0

    def respond(self, reply: RecordDict) -> tuple[str, RecordDict] | None:
        """The next message to the client (action, content), or None when the
        reply is the client's last (its segment weights)."""
        if ARRAYS in reply:
            return None
        cut = from_record(reply.array_records[CUT])
        labels = cut[LABELS]
        gradient, loss = self.server.step(
            decode(self.codec, ACTIVATIONS, cut), labels, cut
        )
        self.loss_sum += loss * len(labels)
        self.examples += len(labels)
        return SPLIT_STEP, RecordDict(
            {CUT: to_record(encode(self.codec, GRADIENT, gradient))}
        )


class UshapeSession(Session):
    """One U-shaped client's round: activations in -> body output out; the
    gradient of the body output in -> the gradient of its input out."""

    def respond(self, reply: RecordDict) -> tuple[str, RecordDict] | None:
        if ARRAYS in reply:
            return None
        cut = from_record(reply.array_records[CUT])
        if any(k.startswith(f"{GRADIENT}.") for k in cut):
            grad = self.server.backward(decode(self.codec, GRADIENT, cut))
            return SPLIT_STEP, RecordDict(
                {CUT: to_record(encode(self.codec, GRADIENT, grad))}
            )
        out, context = self.server.forward(decode(self.codec, ACTIVATIONS, cut), cut)
        return SPLIT_TAIL, RecordDict(
            {CUT: to_record({**encode(self.codec, ACTIVATIONS, out), **context})}
        )


class SplitStrategy(FedAvg):
    """SplitFed V1 (the base): one server-segment copy per client, clients
    served together. Subclasses change :meth:`sessions` and :meth:`serve`.

    Parameters
    ----------
    setup : ServerSetup
        The engine's build (model, experiment, device).
    **kwargs
        Flower ``FedAvg`` options (sampling fractions, message keys...).
    """

    session_type: type[Session] = Session

    def __init__(self, setup: ServerSetup, **kwargs: Any):
        super().__init__(**kwargs)
        self.experiment = setup.experiment
        self.device = setup.device
        self.model = copy.deepcopy(setup.model)
        options = setup.options
        self.cuts = cuts(self.model, options)
        self.segments = split_model(self.model, self.cuts)
        self.codec = CODECS[options.quantization](options)
        #: Metrics of the round the strategy computed itself.
        self._extra: dict[str, float] = {}

    # -- which segments are whose ---------------------------------------------------
    def client_segments(self, segments: list[Segment]) -> list[Segment]:
        """The client's segments (SplitFed: the first)."""
        return segments[:1]

    def server_segment(self, segments: list[Segment]) -> Segment:
        """The server's segment (SplitFed: the last)."""
        return segments[-1]

    def server_of(self, segments: list[Segment]) -> ServerSegment:
        """The server segment of ``segments``, with a fresh optimiser."""
        return ServerSegment(
            self.server_segment(segments),
            self.experiment.train,
            self.device,
            task_for(self.experiment),
        )

    def sessions(self, nodes: list[int], server_round: int) -> dict[int, Session]:
        """V1: each client gets a copy of the global server segment."""
        out = {}
        for node in nodes:
            segments = split_model(copy.deepcopy(self.model), self.cuts)
            out[node] = self.session_type(self.server_of(segments), self.codec)
        return out

    def serve(
        self,
        grid: Grid,
        sessions: Mapping[int, Session],
        replies: Mapping[int, Message],
        *,
        server_round: int,
        timeout: float,
    ) -> tuple[dict[int, Message], int]:
        """V1: all sessions together, one exchange per step. Returns node -> last
        reply, and the number of exchanges."""
        return serve_together(
            grid, sessions, replies, server_round=server_round, timeout=timeout
        )

    def server_state(
        self, sessions: Mapping[int, Session], weights: Mapping[int, float]
    ) -> dict[str, np.ndarray]:
        """V1: the example-weighted average of the clients' server copies."""
        nodes = list(weights)
        states = [
            {k: v.numpy() for k, v in sessions[n].server.segment.state().items()}
            for n in nodes
        ]
        return weighted_average(states, [weights[n] for n in nodes])

    def client_state(self) -> dict[str, torch.Tensor]:
        """What ``train`` sends each client: its segments' weights."""
        return {
            k: v
            for s in self.client_segments(self.segments)
            for k, v in s.state().items()
        }

    # -- the round ------------------------------------------------------------------
    def run_round(
        self,
        server_round: int,
        arrays: ArrayRecord | None,
        grid: Grid,
        *,
        timeout: float,
        hooks: Any,
    ) -> ArrayRecord | None:
        """Send the client segments, serve every session to its end, then FedAvg
        both sides (through ``hooks`` for the client segments)."""
        assert arrays is not None
        self.model.load_state_dict(arrays.to_torch_state_dict())
        own = self.client_state()
        messages = list(
            hooks.configure_train(server_round, ArrayRecord(own), ConfigRecord(), grid)
        )
        if not messages:
            return arrays
        sampled = {m.metadata.dst_node_id for m in messages}
        nodes = [n for n in grid.get_node_ids() if n in sampled]
        contents = {m.metadata.dst_node_id: m.content for m in messages}
        sessions = self.sessions(nodes, server_round)
        replies = exchange(grid, contents, server_round=server_round, timeout=timeout)
        done, exchanges = self.serve(
            grid, sessions, replies, server_round=server_round, timeout=timeout
        )
        self._extra = {"exchanges": 1.0 + exchanges}
        finished = [n for n in nodes if n in done]
        needed = self.experiment.federation.min_replies
        if len(finished) < needed:
            raise RoundFailed(
                f"round {server_round}: {len(finished)} of {len(nodes)} clients "
                f"finished, fewer than federation.min-replies = {needed}"
            )
        weights = {
            n: float(done[n].content.metric_records[METRICS][NUM_EXAMPLES])  # type: ignore[arg-type]
            for n in finished
        }
        seen = sum(sessions[n].examples for n in finished)
        if seen:
            self._extra["loss"] = sum(sessions[n].loss_sum for n in finished) / seen
        client, _ = hooks.aggregate_train(server_round, [done[n] for n in finished])
        if client is None:
            raise RoundFailed(f"round {server_round}: no client segment to average")
        # the round's arrays, where they did not travel (a frozen LoRA base)
        merged = {k: v.numpy() for k, v in arrays.items()}
        merged.update({k: v.numpy() for k, v in client.items()})
        merged.update(self.server_state(sessions, weights))
        return to_record(merged)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvg of the client segments; adds the round's
        ``exchanges`` and the server's training ``loss`` (example-weighted over
        the round's batches) when the server computed it."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            for key, value in self._extra.items():
                if key not in metrics:
                    metrics[key] = value
        return arrays, metrics


class SplitFedV2(SplitStrategy):
    """SplitFed V2: one server segment, its optimiser fresh each round; clients
    served one after another in a seeded order."""

    def sessions(self, nodes: list[int], server_round: int) -> dict[int, Session]:
        server = self.server_of(self.segments)
        return {node: self.session_type(server, self.codec) for node in nodes}

    def serve(
        self,
        grid: Grid,
        sessions: Mapping[int, Session],
        replies: Mapping[int, Message],
        *,
        server_round: int,
        timeout: float,
    ) -> tuple[dict[int, Message], int]:
        order = serving_order(
            [n for n in sessions if n in replies],
            derive_seed(self.experiment.seed, "sfl-v2-order", server_round),
        )
        done: dict[int, Message] = {}
        exchanges = 0
        for node in order:
            one, count = serve_together(
                grid,
                {node: sessions[node]},
                {node: replies[node]},
                server_round=server_round,
                timeout=timeout,
            )
            done.update(one)
            exchanges += count
        return done, exchanges

    def server_state(
        self, sessions: Mapping[int, Session], weights: Mapping[int, float]
    ) -> dict[str, np.ndarray]:
        """The one server segment, as the last client left it."""
        return {
            k: v.numpy() for k, v in self.server_segment(self.segments).state().items()
        }


class UshapeStrategy(SplitStrategy):
    """U-shaped: the client holds the first and last segments, the server the
    body (one copy per client, as SplitFed V1); the clients report the loss."""

    session_type = UshapeSession

    def client_segments(self, segments: list[Segment]) -> list[Segment]:
        return [segments[0], segments[-1]]

    def server_segment(self, segments: list[Segment]) -> Segment:
        return segments[1]


def serve_together(
    grid: Grid,
    sessions: Mapping[int, Session],
    replies: Mapping[int, Message],
    *,
    server_round: int,
    timeout: float,
) -> tuple[dict[int, Message], int]:
    """Answer every reply with its session's next message, one exchange per
    action, until every client sent its last reply. Returns node -> last reply
    (a client whose reply is an error, or missing, leaves the round) and the
    number of exchanges."""
    done: dict[int, Message] = {}
    exchanges = 0
    pending = dict(replies)
    while pending:
        by_action: dict[str, dict[int, RecordDict]] = {}
        for node, message in pending.items():
            if message.has_error():
                continue
            nxt = sessions[node].respond(message.content)
            if nxt is None:
                done[node] = message
            else:
                by_action.setdefault(nxt[0], {})[node] = nxt[1]
        pending = {}
        for action, contents in by_action.items():
            exchanges += 1
            pending.update(
                exchange(
                    grid,
                    contents,
                    server_round=server_round,
                    action=action,
                    timeout=timeout,
                )
            )
    return done, exchanges


def build_v1(setup: ServerSetup) -> SplitStrategy:
    """SplitFed V1."""
    return SplitStrategy(setup, **setup.fedavg_options())


def build_v2(setup: ServerSetup) -> SplitFedV2:
    """SplitFed V2."""
    return SplitFedV2(setup, **setup.fedavg_options())


def build_ushape(setup: ServerSetup) -> UshapeStrategy:
    """U-shaped split learning."""
    return UshapeStrategy(setup, **setup.fedavg_options())
