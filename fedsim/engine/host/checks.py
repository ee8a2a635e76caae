"""The pre-run checks: everything a run needs is checked before anything is
written (resources, the data and the model built once, the family's and the
privacy mechanism's own checks). Errors are :class:`ConfigError` (exit code 2)."""

from __future__ import annotations

import os
from typing import Any

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment


def check_resources(exp: Experiment) -> None:
    """Ray would wait forever for resources this machine does not have."""
    import torch

    res = exp.resources
    cores = os.cpu_count() or 1
    if res.num_cpus > cores:
        raise ConfigError(
            f"resources.num-cpus: {res.num_cpus} exceeds the {cores} cores here"
        )
    gpus = torch.cuda.device_count()
    if res.num_gpus > gpus:
        raise ConfigError(
            f"resources.num-gpus: {res.num_gpus:g} requested per client but "
            f"{gpus} CUDA GPUs are visible"
        )
    if res.device == "cuda" and gpus == 0:
        raise ConfigError(
            "resources.device: 'cuda' requested but no CUDA GPU is visible"
        )


def preflight(exp: Experiment, *, local: bool = True) -> None:
    """Every pre-run check, before anything is written: resources (``local``
    runs only: on a SuperLink the SuperNodes' hosts have their own; this
    host's, or with ``resources.ray-address`` the Ray cluster's nodes and the
    fedsim they run), the data and the model built once, the family's own
    check (e.g. LoRA targets), the privacy mechanism's."""
    from fedsim import privacy
    from fedsim.engine.host import cluster
    from fedsim.learn.base import build_model
    from fedsim.learn.tasks import task_data

    res = exp.resources
    if local and res.ray_address:
        nodes = cluster.survey(res.ray_address)
        cluster.check_cluster(
            res.ray_address, res.num_cpus, res.num_gpus, res.device, nodes
        )
    elif local:
        check_resources(exp)
    data = task_data(exp)
    check_partitions(exp, data)
    model = build_model(exp.model, data.info, exp.seed)
    registry.family(exp.strategy.name).run_check(exp, model, data)
    privacy.preflight(exp, model, data)


def check_partitions(exp: Experiment, data: Any) -> None:
    """Every client has training examples (a client without any would fail in
    its first round): ConfigError naming the clients. Counted from the
    partitions' sizes, so no client's rows are read."""
    empty = [pid for pid in range(exp.federation.clients) if data.train_size(pid) == 0]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise ConfigError(
            f"data.partitioner: {len(empty)} of {exp.federation.clients} clients get "
            f"no training examples (clients {shown}) from {exp.data.partitioner!r} "
            f"over {len(data.pool)} examples; use fewer federation.clients, another "
            "partitioner or a larger data.min-partition-size / data.alpha"
        )
