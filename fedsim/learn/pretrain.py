"""Central pre-training of a base model on public data, cached on disk.

A fine-tuning experiment starts from a base that already knows something: with
``model.pretrain = "digits"`` the base is trained centrally on the *public split*
of digits before any federated round, and the clients then fine-tune it on their
private, non-IID partitions.

The public split is the data set's examples of ``model.pretrain-classes`` (all
classes when empty) outside the global test set, which is drawn exactly as
:func:`fedsim.learn.data.federated_data` draws it for the run's seed and the
default data settings; :func:`fedsim.core.loading.load_experiment` refuses an
experiment whose own data settings would draw a different test set from the
same data set, so no test example is ever pre-trained on. The public examples
may also lie in client partitions: public data is, by definition, available to everyone.

The trained state dict is cached under ``<cache>/pretrain/`` (``FEDSIM_CACHE``,
else ``~/.cache/fedsim``), keyed by a hash of the model config, the data shape and
the seed, so the server and every client process of every run share one build. A
file lock makes concurrent processes wait for the first one instead of training
again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig, ModelConfig
from fedsim.core.seeding import derive_seed
from fedsim.learn.data import Arrays, DatasetInfo, cache_dir, federated_data
from fedsim.learn.models import build_architecture
from fedsim.learn.training import make_loader, train_epochs

#: Bump when pre-training changes, so that old cached bases are not reused.
RECIPE_VERSION = 1
#: Optimiser of central pre-training (Adam, this learning rate, this batch size).
LEARNING_RATE = 1e-3
BATCH_SIZE = 32


def public_split(cfg: ModelConfig, info: DatasetInfo, seed: int) -> Arrays:
    """The public examples the base of ``cfg`` is pre-trained on.

    Parameters
    ----------
    cfg : ModelConfig
        Names the public data set (``pretrain``) and its classes.
    info : DatasetInfo
        Shape and classes of the federated task, which the public data must fit.
    seed : int
        Run seed; it draws the global test set that the split leaves out.

    Raises
    ------
    ConfigError
        The public data does not fit the model, or a class is out of range.
    """
    data_cfg = dataclasses.replace(
        DataConfig(), dataset=cfg.pretrain, partitioner="iid"
    )
    public = federated_data(data_cfg, 1, seed)
    if public.info.input_shape != info.input_shape:
        raise ConfigError(
            f"model.pretrain: {cfg.pretrain!r} has input shape "
            f"{public.info.input_shape}, the federated data {info.input_shape}"
        )
    limit = min(public.info.num_classes, info.num_classes)
    bad = [c for c in cfg.pretrain_classes if c >= limit]
    if bad:
        raise ConfigError(
            f"model.pretrain-classes: {bad[0]} is out of range; classes are 0.."
            f"{limit - 1}"
        )
    classes = cfg.pretrain_classes or tuple(range(limit))
    return public.pool.subset(np.flatnonzero(np.isin(public.pool.y, classes)))


def cache_key(cfg: ModelConfig, info: DatasetInfo, seed: int) -> str:
    """Hex digest naming the cached base of ``cfg`` for this data shape and seed."""
    payload = {
        "recipe": RECIPE_VERSION,
        "model": dataclasses.asdict(cfg),
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
        "seed": seed,
    }
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_path(cfg: ModelConfig, info: DatasetInfo, seed: int) -> Path:
    """Where the pre-trained state dict of ``cfg`` is cached."""
    return cache_dir() / "pretrain" / f"{cfg.name}-{cache_key(cfg, info, seed)}.pt"


def pretrain(cfg: ModelConfig, info: DatasetInfo, seed: int) -> dict[str, torch.Tensor]:
    """Train the base of ``cfg`` centrally on its public split (no caching).

    The model starts from :func:`fedsim.learn.models.build_architecture`'s seeded
    init of the same architecture and trains every parameter with Adam for
    ``cfg.pretrain_epochs`` epochs, on CPU, with seeded shuffling.

    Returns
    -------
    dict of str to Tensor
        The trained state dict.
    """
    model = build_architecture(cfg, info, seed)
    public = public_split(cfg, info, seed)
    run_seed = derive_seed(seed, "pretrain")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run_seed)
        loader = make_loader(public, BATCH_SIZE, seed=run_seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        train_epochs(
            model,
            loader,
            optimizer,
            epochs=cfg.pretrain_epochs,
            device=torch.device("cpu"),
        )
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pretrained_state(
    cfg: ModelConfig, info: DatasetInfo, seed: int
) -> dict[str, torch.Tensor]:
    """The cached pre-trained state dict of ``cfg``; trains and caches it first if
    no process has yet.

    Parameters
    ----------
    cfg : ModelConfig
        Model with ``pretrain`` set.
    info : DatasetInfo
        Shape and classes of the federated task.
    seed : int
        Run seed.
    """
    path = cache_path(cfg, info, seed)
    with _locked(path):
        if not path.exists():
            state = pretrain(cfg, info, seed)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
    return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
