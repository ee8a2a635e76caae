"""Tasks: what a model is trained for, owning its loss, metrics and collation.

The families never ask which task runs: a client trains with ``task.loss`` and
evaluates with ``task.evaluate``; the engine gets the run's data through
:func:`task_data`, which tokenises text rows with the model's tokenizer.

- :class:`Classification` (every built-in model, ``sequence-classification``,
  ``image-classification``): cross-entropy of the logits; metrics ``loss`` and
  ``accuracy`` (exactly :func:`fedsim.learn.training.evaluate`).
- :class:`CausalLM` (``causal-lm``): next-token cross-entropy on the target
  (response) tokens only, the mean over those tokens of the batch (PEFT /
  transformers' ``labels = -100`` convention); metrics ``loss`` (the mean over
  all target tokens of the split) and ``perplexity`` = exp(loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Protocol

import torch
import torch.nn.functional as F
from flwr.app import MetricRecord
from torch import nn

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig, Experiment, ModelConfig
from fedsim.core.messages import NUM_EXAMPLES
from fedsim.learn.data import Arrays, FederatedData, federated_data
from fedsim.learn.text import TARGET, is_text, tokenize_rows, trim
from fedsim.learn.training import cross_entropy, evaluate


@dataclass(frozen=True)
class TaskMetrics:
    """An evaluation's metrics (``loss`` first) and how many examples it saw."""

    values: dict[str, float]
    examples: int


class Task(Protocol):
    """Loss and evaluation of one kind of model output."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch, to minimise."""
        ...

    def evaluate(
        self, model: nn.Module, arrays: Arrays, *, device: torch.device
    ) -> TaskMetrics:
        """The metrics of ``model`` on a split."""
        ...

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the loss of a batch needs besides the logits (split learning
        sends it to the side holding the loss)."""
        ...

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch from its logits and :meth:`targets`."""
        ...


@dataclass(frozen=True)
class Classification:
    """Cross-entropy and accuracy of class logits."""

    batch_size: int = 512

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(model, x, y)

    def evaluate(
        self, model: nn.Module, arrays: Arrays, *, device: torch.device
    ) -> TaskMetrics:
        stats = evaluate(model, arrays, device=device, batch_size=self.batch_size)
        return TaskMetrics(
            {"loss": stats.loss, "accuracy": stats.accuracy}, stats.examples
        )

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The labels."""
        return y

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


def token_losses(logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target tokens of a tokenised
    batch ``x`` (``(b, 2, L)``, cut to ``logits``' length) and their count."""
    n = logits.shape[1]
    ids, kinds = x[:, 0, :n], x[:, 1, :n]
    wanted = kinds[:, 1:] == TARGET
    predicted = logits[:, :-1][wanted].float()
    total = F.cross_entropy(predicted, ids[:, 1:][wanted], reduction="sum")
    return total, int(wanted.sum())


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction on the target tokens; loss and perplexity."""

    batch_size: int = 8

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.logits_loss(model(x), x)

    def targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The tokenised batch (cut to its longest row): next-token prediction's
        labels are the tokens, its kinds say which are in the loss."""
        return trim(x)  # type: ignore[no-any-return]

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total, count = token_losses(logits, targets)
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, arrays: Arrays, *, device: torch.device
    ) -> TaskMetrics:
        model.eval()
        if len(arrays) == 0:
            nan = float("nan")
            return TaskMetrics({"loss": nan, "perplexity": nan}, 0)
        total, count = 0.0, 0
        for start in range(0, len(arrays), self.batch_size):
            x = torch.from_numpy(arrays.x[start : start + self.batch_size]).to(device)
            value, n = token_losses(model(x), x)
            total, count = total + float(value), count + n
        loss = total / max(count, 1)
        return TaskMetrics({"loss": loss, "perplexity": math.exp(loss)}, len(arrays))


def task_for(exp: Experiment) -> Task:
    """The task of an experiment's model."""
    if exp.model.name == "hf" and exp.model.task == "causal-lm":
        return CausalLM(batch_size=exp.train.batch_size)
    if exp.model.name == "hf":
        return Classification(batch_size=exp.train.batch_size)
    return Classification()


def _check_images(data: FederatedData) -> None:
    if len(data.info.input_shape) != 3:
        raise ConfigError(
            "model.task: 'image-classification' needs image data (channels, "
            f"height, width); the data has input shape {data.info.input_shape}"
        )


def tokenized(
    data: FederatedData, model: ModelConfig, max_length: int
) -> FederatedData:
    """``data`` with its text rows tokenised by the model's tokenizer."""
    from fedsim.learn.hf import load_tokenizer

    tokenizer = load_tokenizer(model)
    pool = Arrays(tokenize_rows(data.pool.x, tokenizer, max_length), data.pool.y)
    test = Arrays(tokenize_rows(data.test.x, tokenizer, max_length), data.test.y)
    targets = data.pool.x[:, 1] != ""
    kept = (pool.x[:, 1] == TARGET).any(axis=1)
    if targets.any() and not kept[targets].any():
        raise ConfigError(
            f"data.max-length: {max_length} tokens cut every row before its "
            "response (the prompts are longer); raise it"
        )
    return replace(data, pool=pool, test=test)


@lru_cache(maxsize=2)
def _task_data(
    data_cfg: DataConfig, model: ModelConfig, clients: int, seed: int
) -> FederatedData:
    data = federated_data(data_cfg, clients, seed)
    if not is_text(data_cfg):
        return data
    return tokenized(data, model, data_cfg.max_length)


def task_data(exp: Experiment) -> FederatedData:
    """The run's data as its model takes it (built once per process):
    :func:`fedsim.learn.data.federated_data`, with text rows tokenised by the
    model's tokenizer (the task and the kind of data agree:
    :func:`fedsim.core.loading.check_consistency`)."""
    data = _task_data(exp.data, exp.model, exp.federation.clients, exp.seed)
    if exp.model.name == "hf" and exp.model.task == "image-classification":
        _check_images(data)
    return data


def metric_record(metrics: TaskMetrics) -> MetricRecord:
    """The metrics of an ``evaluate`` reply: the task's, then ``num-examples``."""
    return MetricRecord({**metrics.values, NUM_EXAMPLES: metrics.examples})
