"""FedProphet's client side: PGD training of the stage's (and prophet) modules
on cached stage inputs.

See :mod:`fedsim.strategies.fedprophet` for the paper, the deviations and the message
contract.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

from fedsim.clients.full import evaluation_reply
from fedsim.core.capacity import capacity_of
from fedsim.core.experiment import Experiment
from fedsim.core.messages import ARRAYS, METRICS, NUM_EXAMPLES
from fedsim.core.seeding import derive_seed
from fedsim.learn.base import build_model
from fedsim.learn.cascade import (
    BOUNDED,
    EPSILON,
    PROPHETS,
    STAGE,
    aux_key,
    cascade_for,
)
from fedsim.learn.data import Arrays, ClientData, DatasetInfo
from fedsim.learn.robust import feature_pgd, pgd
from fedsim.learn.training import (
    make_loader,
    make_optimizer,
    train_epochs,
)

#: Bytes in a megabyte.
MB = 1e6


class Stage(nn.Module):
    """The modules a client trains this round, with their heads, and the stage
    loss ``(1 - psi) * stage loss + psi * prophet loss``, each ``CE(head(z)) +
    mu/2 * ||z||^2 / B`` (plain CE where the module is the model's last)."""

    def __init__(
        self,
        stage: nn.Module,
        stage_head: nn.Module | None,
        prophet: nn.Module | None,
        prophet_head: nn.Module | None,
        *,
        mu: float,
        psi: float,
    ):
        super().__init__()
        self.stage, self.stage_head = stage, stage_head
        self.prophet, self.prophet_head = prophet, prophet_head
        self.mu, self.psi = mu, psi

    def _part(self, z: torch.Tensor, head: nn.Module | None, y: torch.Tensor) -> Any:
        if head is None:
            return F.cross_entropy(z, y)
        return F.cross_entropy(head(z), y) + self.mu / 2 * z.square().sum() / len(z)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's prediction (its head on its output), what PGD attacks."""
        z = self.stage(x)
        return z if self.stage_head is None else self.stage_head(z)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.stage(x)
        stage_loss = self._part(z, self.stage_head, y)
        if self.prophet is None or self.psi == 0:
            return stage_loss  # type: ignore[no-any-return]
        prophet_loss = self._part(self.prophet(z), self.prophet_head, y)
        return (1 - self.psi) * stage_loss + self.psi * prophet_loss  # type: ignore[no-any-return]


class FedProphetClient:
    """Builds the model, its cascade and heads once per process; each message
    loads the received modules and heads.

    Parameters
    ----------
    experiment : Experiment
        The run's configuration (the family's keys).
    info : DatasetInfo
        Input shape and classes.
    device : torch.device
        Where training runs.
    """

    def __init__(self, experiment: Experiment, info: DatasetInfo, device: torch.device):
        self.experiment = experiment
        self.options = experiment.strategy.options
        self.device = device
        self.model = build_model(experiment.model, info, experiment.seed).to(device)
        self.cascade = cascade_for(experiment, self.model, info)
        for head in self.cascade.heads.values():
            head.to(device)
        #: (partition id, stage) -> that stage's inputs on the client's train split
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def load(self, content: RecordDict) -> None:
        """Copy the received model parameters and heads in by name."""
        received = content.array_records[ARRAYS].to_torch_state_dict()
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in received.items():
                if name.startswith("aux."):
                    m, _, rest = name[4:].partition(".")
                    target = dict(self.cascade.heads[int(m)].named_parameters())[rest]
                else:
                    target = params[name]
                target.copy_(value)

    def stage_inputs(self, pid: int, stage: int, split: Arrays) -> torch.Tensor:
        """The frozen modules' output on ``split`` (cached per stage)."""
        key = (pid, stage)
        if key not in self.cache:
            x = torch.from_numpy(split.x).to(self.device)
            with torch.no_grad():
                if stage > 0:
                    x = self.cascade.net(0, stage - 1).eval()(x)
            self.cache = {k: v for k, v in self.cache.items() if k[0] != pid}
            self.cache[key] = x
        return self.cache[key]

    def stage_model(self, stage: int, prophets: int) -> Stage:
        last = stage + prophets
        return Stage(
            self.cascade.net(stage, stage),
            self.cascade.heads.get(stage),
            self.cascade.net(stage + 1, last) if prophets else None,
            self.cascade.heads.get(last) if prophets else None,
            mu=self.options.mu,
            psi=self.options.psi,
        )

    def train(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """PGD training of the assigned modules for ``local-iterations`` steps."""
        exp, opts, config = self.experiment, self.options, content["config"]
        stage, prophets = int(config[STAGE]), int(config[PROPHETS])  # type: ignore[arg-type,index]
        epsilon = float(config[EPSILON])  # type: ignore[arg-type,index]
        bounds = (0.0, 1.0 if stage == 0 else math.inf) if config[BOUNDED] else None  # type: ignore[index]
        self.load(content)
        model = self.stage_model(stage, prophets)
        x = self.stage_inputs(data.partition_id, stage, data.train)
        seed = derive_seed(exp.seed, "train", server_round, data.partition_id)
        torch.manual_seed(seed)
        loader = make_loader(
            Arrays(x.cpu().numpy(), data.train.y), exp.train.batch_size, seed=seed
        )
        batches = list(itertools.islice(itertools.cycle(loader), opts.local_iterations))
        generator = torch.Generator(device=self.device).manual_seed(seed)

        def loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            adv = pgd(
                model.logits,
                xb,
                yb,
                epsilon=epsilon,
                steps=opts.steps,
                step_size=2.5 * epsilon / opts.steps,
                bounds=bounds,
                generator=generator,
            )
            return model.loss(adv, yb)

        optimizer = make_optimizer(model.parameters(), exp.train)
        stats = train_epochs(
            model, batches, optimizer, epochs=1, device=self.device, loss=loss
        )
        trained = {
            n: p.detach().cpu()
            for n, p in self.model.named_parameters()
            if any(
                n in self.cascade.names[m] for m in range(stage, stage + prophets + 1)
            )
        }
        for m in {stage, stage + prophets} & set(self.cascade.heads):
            for n, p in self.cascade.heads[m].named_parameters():
                trained[f"{aux_key(m)}{n}"] = p.detach().cpu()
        memory = sum(self.cascade.part.memory[stage : stage + prophets + 1])
        budget = capacity_of(opts.memory_mb, data.partition_id)
        metrics: dict[str, Any] = {
            "loss": stats.loss,
            NUM_EXAMPLES: len(data.train) if stats.steps else 0,
            "stage": stage,
            "prophets": prophets,
            "params": float(sum(v.numel() for v in trained.values())),
            "memory-mb": memory / MB,
            "budget-mb": budget,
        }
        return RecordDict(
            {ARRAYS: ArrayRecord(trained), METRICS: MetricRecord(metrics)}
        )

    def predictor(self, stage: int) -> nn.Module:
        """Modules ``0..stage`` with the stage's head (the model at the end)."""
        net = self.cascade.net(0, stage)
        head = self.cascade.heads.get(stage)
        return nn.Sequential(net, head) if head is not None else net

    def evaluate(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Clean and PGD accuracy of the model up to the stage, with its head."""
        self.load(content)
        model = self.predictor(int(content["config"][STAGE]))  # type: ignore[arg-type,index]
        return evaluation_reply(
            model,
            data,
            self.experiment,
            server_round=server_round,
            device=self.device,
        )

    def perturbation(
        self,
        content: RecordDict,
        data: ClientData,
        *,
        server_round: int,
        state: RecordDict,
    ) -> RecordDict:
        """Mean L2 norm of how far PGD examples of the stage's inputs move the
        finished module's output (PGD maximising that distance,
        :func:`fedsim.learn.robust.feature_pgd`); the output's size and
        smallest value."""
        config = content["config"]
        stage, epsilon = int(config[STAGE]), float(config[EPSILON])  # type: ignore[arg-type,index]
        bounds = (0.0, 1.0 if stage == 0 else math.inf) if config[BOUNDED] else None  # type: ignore[index]
        self.load(content)
        model = self.stage_model(stage, 0).eval()
        x = self.stage_inputs(data.partition_id, stage, data.train)
        generator = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.experiment.seed, "perturbation", data.partition_id)
        )
        adv = feature_pgd(
            model.stage,
            x,
            epsilon=epsilon,
            steps=self.options.steps,
            step_size=2.5 * epsilon / self.options.steps,
            bounds=bounds,
            generator=generator,
        )
        with torch.no_grad():
            clean, moved = model.stage(x), model.stage(adv)
        norms = (moved - clean).flatten(1).norm(dim=1)
        metrics = {
            "perturbation": float(norms.mean()),
            "feature-dim": float(clean[0].numel()),
            "feature-min": float(clean.min()),
        }
        return RecordDict({METRICS: MetricRecord(metrics)})
