"""The strategy wrappers of DP-FedAvg's chain (see :mod:`fedsim.privacy.dp_fedavg`).

- :class:`FixedDenominatorMean`: the clipped models' mean over a denominator
  fixed before the round, around the family's FedAvg;
- :class:`PoissonSampling`: every client joins a round with a fixed
  probability, independently;
- :class:`FixedClipping`, :class:`AdaptiveClipping`: Flower 1.41's server-side
  clipping wrappers with the hooks overridden that decide what is released
  (which replies are clipped, the count, the norm update, the noise).

The maths is in :mod:`fedsim.privacy.dp_fedavg_maths`; these only unpack
messages, call it and pack the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedsim.core.seeding import derive_seed
from fedsim.flwr_private import log, norm
from fedsim.privacy import accounting
from fedsim.privacy import dp_fedavg_maths as maths
from fedsim.protocol.wrapping import DelegatingStrategy


def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy ``Generator``'s bit-generator state (JSON values; resume)."""
    return dict(rng.bit_generator.state)


def restore_generator(rng: np.random.Generator, state: Mapping[str, Any]) -> None:
    """Put ``rng`` back in the state :func:`generator_state` captured."""
    rng.bit_generator.state = {
        k: dict(v) if isinstance(v, Mapping) else v for k, v in state.items()
    }


#: Above this ratio of update noise to accounted noise, adaptive clipping warns.
SIGNIFICANT_NOISE_RATIO = 2.0


def _is_zero_update(reply: Message, current: Sequence[np.ndarray]) -> bool:
    records = list(reply.content.array_records.values())
    return bool(records) and all(
        norm(
            [
                np.subtract(x, y)
                for x, y in zip(r.to_numpy_ndarrays(), current, strict=True)
            ]
        )
        == 0.0
        for r in records
    )


def split_replies(
    replies: Iterable[Message], current: ArrayRecord
) -> tuple[list[Message], int]:
    """The replies with an update to clip, and how many updates were zero.

    Error replies are left out (the client contributes nothing); so are updates
    whose norm, as Flower's clipping computes it, is 0 (it would divide by it):
    their clipped update is 0 either way.
    """
    arrays = current.to_numpy_ndarrays()
    kept, zeros = [], 0
    for reply in replies:
        if reply.has_error():
            continue
        if _is_zero_update(reply, arrays):
            zeros += 1
        else:
            kept.append(reply)
    return kept, zeros


def _noised(
    record: ArrayRecord, stddev: float, rng: np.random.Generator
) -> ArrayRecord:
    noisy = maths.add_noise(record.to_numpy_ndarrays(), stddev, rng)
    log(INFO, "aggregate_train: central DP noise with %.4g stdev added", stddev)
    return ArrayRecord(
        {k: Array(np.asarray(v)) for k, v in zip(record.keys(), noisy, strict=True)}
    )


class FixedDenominatorMean(DelegatingStrategy):
    """The mean of the clipped models over a denominator fixed before the round.

    Replaces the arrays of the wrapped FedAvg's weighted mean by
    :func:`fedsim.privacy.dp_fedavg_maths.fixed_denominator_mean`: every reply
    weighs 1 (the sensitivity bound needs it) and a client that did not reply
    counts as a zero update, so one client moves the mean by at most
    ``clipping_norm / denominator`` whatever the replies. FedAvg still checks
    the replies and averages their metrics, each weight set to 1 (a round whose
    clients trained on no examples must not divide by zero; the recorder has
    already recorded the true ``num-examples``).

    Parameters
    ----------
    strategy : FedAvg
        The family's FedAvg (possibly behind :class:`PoissonSampling`).
    denominator : float
        Clients the round is calibrated for (> 0).
    weight_key : str
        FedAvg's ``weighted_by_key``.
    """

    def __init__(self, strategy: Strategy, *, denominator: float, weight_key: str):
        if denominator <= 0:
            raise ValueError(f"denominator must be > 0, got {denominator}")
        self.strategy = strategy
        self.denominator = denominator
        self.weight_key = weight_key
        self.current_arrays = ArrayRecord()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)  # type: ignore[no-any-return]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        for reply in replies:
            for record in reply.content.metric_records.values():
                record[self.weight_key] = 1
        _, metrics = self.strategy.aggregate_train(server_round, replies)
        names = list(self.current_arrays.keys())
        models = [
            [record[k].numpy() for k in names]
            for reply in replies
            for record in reply.content.array_records.values()
        ]
        mean = maths.fixed_denominator_mean(
            self.current_arrays.to_numpy_ndarrays(), models, self.denominator
        )
        arrays = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in zip(names, mean, strict=True)}
        )
        return arrays, metrics


class PoissonSampling(DelegatingStrategy):
    """Poisson client sampling: each connected client trains in a round
    independently with probability ``sample_rate``.

    The wrapped FedAvg's train messages give the content (FedAvg sends every
    client the same); this chooses who gets it, drawing one uniform per client
    in the grid's node order from a generator seeded by ``(seed, "poisson",
    server_round)``. A round may draw no client: it sends nothing, and the
    release (noise only) is still accounted.

    Parameters
    ----------
    strategy : FedAvg
        The family's FedAvg (its ``configure_train`` is FedAvg's own).
    sample_rate : float
        Probability that a client joins a round, in (0, 1].
    seed : int
        The run's seed.
    """

    def __init__(self, strategy: Strategy, *, sample_rate: float, seed: int):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.strategy = strategy
        self.sample_rate = sample_rate
        self.seed = seed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(
            self.strategy.configure_train(server_round, arrays, config, grid)
        )
        if not messages:
            return []
        template = messages[0]
        nodes = list(grid.get_node_ids())
        rng = np.random.default_rng(derive_seed(self.seed, "poisson", server_round))
        chosen = maths.poisson_sample(len(nodes), self.sample_rate, rng)
        return [
            Message(
                content=template.content,
                message_type=template.metadata.message_type,
                dst_node_id=nodes[i],
            )
            for i in chosen
        ]


class FixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, releasing what the accountant assumes.

    Flower 1.41 skips a round with any error reply, divides by a zero update's
    norm, and noises with ``z C / num_sampled_clients`` a mean over the replies
    that came back. This subclass hands Flower only the replies with an update
    to clip (:func:`split_replies`), wraps a :class:`FixedDenominatorMean`, and
    overrides the hook that adds the noise to draw ``z C / denominator`` from
    ``rng``.

    Parameters
    ----------
    strategy : FixedDenominatorMean
        The mean over the same ``denominator``.
    noise_multiplier, clipping_norm : float
        Flower's parameters.
    denominator : float
        Clients the round is calibrated for.
    rng : numpy.random.Generator
        Where the noise comes from.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        denominator: float,
        rng: np.random.Generator,
    ):
        super().__init__(
            strategy, noise_multiplier, clipping_norm, max(1, round(denominator))
        )
        self.denominator = denominator
        self.rng = rng

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, _ = split_replies(replies, self.current_arrays)
        # Flower compares the replies with num_sampled_clients only to warn that
        # its mean would be under-noised; the fixed denominator makes any count
        # safe, so Flower is told the count it gets.
        self.num_sampled_clients = len(kept)
        return super().aggregate_train(server_round, kept)

    def _add_noise_to_aggregated_arrays(
        self, aggregated_arrays: ArrayRecord
    ) -> ArrayRecord:
        stddev = maths.noise_stddev(
            self.noise_multiplier, self.clipping_norm, self.denominator
        )
        return _noised(aggregated_arrays, stddev, self.rng)

    def checkpoint_state(self) -> dict[str, Any]:
        """The noise generator's state (resume)."""
        return {"rng": generator_state(self.rng)}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue drawing noise where the checkpointed run stopped."""
        restore_generator(self.rng, state["rng"])


def log_noise_split(
    noise_multiplier: float,
    update_noise_multiplier: float,
    count_stddev: float,
    count_release: str = "uncentred",
) -> None:
    """Log how adaptive clipping splits the accounted noise (a warning when the
    updates get at least :data:`SIGNIFICANT_NOISE_RATIO` times it)."""
    ratio = maths.adaptive_noise_ratio(
        noise_multiplier, count_stddev, accounting.COUNT_SENSITIVITY[count_release]
    )
    significant = ratio >= SIGNIFICANT_NOISE_RATIO
    log(
        WARNING if significant else INFO,
        "dp-fedavg adaptive clipping: noise multiplier %.4g is accounted for the "
        "updates and the clipped count together; the updates get %.4g (%.2fx) "
        "and the %s count a std of %.4g%s",
        noise_multiplier,
        update_noise_multiplier,
        ratio,
        count_release,
        count_stddev,
        "; raise privacy.clipped-count-stddev to give the updates less"
        if significant
        else "",
    )


class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, with Andrew et al.'s update.

    Overrides Flower 1.41's hooks: ``_noisy_fraction`` returns the noisy,
    clamped share of *unclipped* updates over the fixed ``denominator`` (zero
    updates, left out of Flower's clipping, count as unclipped);
    ``_geometric_update`` receives it and holds the new norm back until
    ``aggregate_train`` has noised the aggregate with the norm that clipped it;
    ``_add_noise_to_aggregated_arrays`` draws ``z_u C / denominator`` from
    ``rng``. Flower's own split of the noise (with ``2 * count_stddev``, and
    its warning) is not used: Flower gets noise multiplier 0 and the updates'
    ``z_u`` comes from :func:`fedsim.privacy.accounting.adaptive_update_noise`.

    Parameters
    ----------
    strategy : FixedDenominatorMean
        The mean over the same ``denominator``.
    noise_multiplier : float
        The accounted noise multiplier of updates and count together.
    count_stddev : float
        Noise std of the unclipped count; > noise_multiplier times the count's
        sensitivity.
    count_release : {"centred", "uncentred"}
        Each client counts ``b - 1/2`` (sensitivity 1/2, Andrew et al. and
        TF-Privacy) or ``b`` (sensitivity 1); the noise split follows.
    denominator : float
        Clients the round is calibrated for.
    rng : numpy.random.Generator
        Where the noise comes from.
    initial_clipping_norm, target_unclipped_quantile, clip_norm_lr : float
        The norm of round 1, the share of updates it should leave unclipped,
        and the learning rate of the geometric update.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        count_stddev: float,
        denominator: float,
        rng: np.random.Generator,
        initial_clipping_norm: float,
        target_unclipped_quantile: float,
        clip_norm_lr: float,
        count_release: str,
    ):
        super().__init__(
            strategy,
            0.0,
            max(1, round(denominator)),
            initial_clipping_norm=initial_clipping_norm,
            target_clipped_quantile=target_unclipped_quantile,
            clip_norm_lr=clip_norm_lr,
            clipped_count_stddev=count_stddev,
        )
        self.noise_multiplier = accounting.adaptive_update_noise(
            noise_multiplier, count_stddev, count_release
        )
        self.count_release = count_release
        self.target_unclipped_quantile = target_unclipped_quantile
        self.denominator = denominator
        self.rng = rng
        self._zero_updates = 0
        self._next_norm: float | None = None
        log_noise_split(
            noise_multiplier, self.noise_multiplier, count_stddev, count_release
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, self._zero_updates = split_replies(replies, self.current_arrays)
        self.num_sampled_clients = len(kept)  # as in FixedClipping.aggregate_train
        result = super().aggregate_train(server_round, kept)
        if self._next_norm is not None:
            self.clipping_norm, self._next_norm = self._next_norm, None
        return result  # type: ignore[no-any-return]

    def _noisy_fraction(self, count: int, total: int) -> float:
        # Flower passes the clipped count among the ``total`` updates it clipped.
        unclipped = total - count + self._zero_updates
        counted = total + self._zero_updates
        return maths.noisy_unclipped_fraction(
            unclipped,
            self.clipped_count_stddev,
            self.denominator,
            self.rng,
            replies=counted if self.count_release == "centred" else None,
        )

    def _geometric_update(self, clipped_fraction: float) -> None:
        # Flower passes what _noisy_fraction returned: the unclipped share.
        self._next_norm = maths.next_clipping_norm(
            self.clipping_norm,
            clipped_fraction,
            self.target_unclipped_quantile,
            self.clip_norm_lr,
        )

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        stddev = maths.noise_stddev(
            self.noise_multiplier, self.clipping_norm, self.denominator
        )
        return _noised(aggregated, stddev, self.rng)

    def checkpoint_state(self) -> dict[str, Any]:
        """The clipping norm of the next round and the noise generator's state
        (resume)."""
        assert self._next_norm is None, "checkpoint between rounds only"
        return {"clipping-norm": self.clipping_norm, "rng": generator_state(self.rng)}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue with the checkpointed clipping norm and noise generator."""
        self.clipping_norm = float(state["clipping-norm"])
        restore_generator(self.rng, state["rng"])
