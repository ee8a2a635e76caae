"""Which rows each client holds: flwr-datasets partitioners over the training pool.

A partitioner runs on a small table of the pool's labels, row numbers and (with
``data.partition-by``) the partitioning column; its partitions are row numbers
into the pool.

- ``iid``, ``dirichlet``, ``pathological``: set by their own ``data.*`` keys, as
  before (IID's contiguous shards are mapped through a seeded permutation).
- ``natural-id``: flwr-datasets' ``NaturalIdPartitioner`` on ``data.partition-by``
  (a writer, a speaker): one client per id when ``federation.clients`` equals the
  number of ids in the pool; with fewer clients, the ids are grouped
  (:func:`group_ids`: seeded, as even in rows as the ids allow); more clients than
  ids is an input error.
- every other flwr-datasets row partitioner by name, with
  ``data.partitioner-args`` as its keyword arguments. fedsim sets
  ``num_partitions`` (``federation.clients``), ``partition_by`` (the label, or
  the ``data.partition-by`` column) and ``seed`` (the experiment's); the table is
  shuffled with the seed first, as ``FederatedDataset(shuffle=True)`` does.
  Unknown, missing or rejected arguments, a partition count other than
  ``federation.clients`` and an empty client are input errors, found before the
  dataset is loaded where the arguments alone tell.
"""

from __future__ import annotations

import heapq
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig

#: Arguments fedsim sets itself (from federation.clients, data.partition-by, seed).
_OWNED = {
    "num_partitions": "federation.clients",
    "partition_by": "data.partition-by",
    "seed": "the experiment's seed",
}


def _class(cfg: DataConfig) -> Any:
    return registry.PARTITIONERS[cfg.partitioner].load()


def _column(cfg: DataConfig) -> str:
    """The table column a partitioner partitions by."""
    own_column = cfg.partition_by and cfg.partition_by != cfg.label_column
    return "id" if own_column else "label"


def partitioner_kwargs(
    cfg: DataConfig, num_partitions: int, seed: int
) -> dict[str, Any]:
    """Keyword arguments of a partitioner named by ``data.partitioner`` that takes
    ``data.partitioner-args`` (ConfigError for unknown or missing ones)."""
    cls = _class(cfg)
    params = {
        n: p
        for n, p in inspect.signature(cls).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    given = {k.replace("-", "_"): v for k, v in cfg.partitioner_args.plain().items()}
    name = cls.__name__
    for key in given:
        if key in _OWNED:
            raise ConfigError(
                f"data.partitioner-args: {key} is set from {_OWNED[key]}; leave it out"
            )
        if key not in params:
            allowed = ", ".join(n for n in params if n not in _OWNED) or "none"
            raise ConfigError(
                f"data.partitioner-args: {key!r} is not an argument of {name}; "
                f"its arguments: {allowed}"
            )
    owned = {"num_partitions": num_partitions, "partition_by": _column(cfg)}
    owned["seed"] = seed
    for key, value in given.items():
        # a TOML list where the partitioner takes only a numpy array
        hint = str(params[key].annotation)
        if isinstance(value, list) and "ndarray" in hint.lower() and "list" not in hint:
            given[key] = np.asarray(value)
    kwargs = {k: v for k, v in owned.items() if k in params} | given
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        raise ConfigError(
            f"data.partitioner-args: {name} needs {', '.join(missing)} "
            f"(data.partitioner = {cfg.partitioner!r})"
        )
    return kwargs


def check(cfg: DataConfig, num_partitions: int, seed: int) -> None:
    """What can be checked before the data is loaded."""
    if cfg.partitioner not in registry.OWN_KEYS_PARTITIONERS:
        partitioner_kwargs(cfg, num_partitions, seed)


def group_ids(sizes: Sequence[int], groups: int, seed: int) -> list[np.ndarray]:
    """Put ids of ``sizes`` rows into ``groups`` groups, as even in rows as the
    ids allow: largest ids first, each to the group with the fewest rows so far
    (longest-processing-time-first; the fullest group exceeds the emptiest by at
    most one id's rows). The seed orders ids of equal size and numbers the
    groups. Returns the ids (indices into ``sizes``) of each group, sorted."""
    if not 1 <= groups <= len(sizes):
        raise ValueError(f"cannot put {len(sizes)} ids into {groups} groups")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-np.asarray(sizes)[order], kind="stable")]
    heap = [(0, g) for g in range(groups)]
    members: list[list[int]] = [[] for _ in range(groups)]
    for i in order:
        rows, g = heapq.heappop(heap)
        members[g].append(int(i))
        heapq.heappush(heap, (rows + int(sizes[i]), g))
    return [np.sort(np.asarray(members[g])) for g in rng.permutation(groups)]


def _table(labels: np.ndarray, ids: np.ndarray | None) -> Any:
    import datasets

    columns: dict[str, Any] = {"label": labels, "row": np.arange(len(labels))}
    if ids is not None:
        columns["id"] = ids
    return datasets.Dataset.from_dict(columns)


def _rows(partitioner: Any, count: int) -> list[np.ndarray]:
    return [
        np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
        for i in range(count)
    ]


def natural_id(
    cfg: DataConfig, ids: np.ndarray, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """One partition per id (NaturalIdPartitioner), or ids grouped."""
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by="id")
    partitioner.dataset = _table(np.zeros(len(ids), np.int64), ids)
    count = partitioner.num_partitions
    if num_partitions > count:
        raise ConfigError(
            f"federation.clients: {num_partitions} exceeds the {count} distinct "
            f"values of data.partition-by = {cfg.partition_by!r} in the training "
            "pool; set at most that many clients"
        )
    # each id's rows in row order, as load_partition(i) selects them, in one
    # pass instead of a Dataset.select per id (3,500 of them for FEMNIST)
    pid_of = {v: i for i, v in partitioner.partition_id_to_natural_id.items()}
    codes = np.fromiter((pid_of[v] for v in ids.tolist()), np.int64, len(ids))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(count + 1))
    per_id = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if num_partitions == count:
        return per_id
    sizes = [len(rows) for rows in per_id]
    return [
        np.sort(np.concatenate([per_id[i] for i in group]))
        for group in group_ids(sizes, num_partitions, seed)
    ]


def _legacy(cfg: DataConfig, num_partitions: int, seed: int) -> Any:
    cls = _class(cfg)
    if cfg.partitioner == "iid":
        return cls(num_partitions=num_partitions)
    if cfg.partitioner == "dirichlet":
        return cls(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    return cls(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=cfg.classes_per_client,
        class_assignment_mode="first-deterministic",
        seed=seed,
    )


def _by_args(
    cfg: DataConfig, labels: np.ndarray, ids: np.ndarray | None, n: int, seed: int
) -> list[np.ndarray]:
    kwargs = partitioner_kwargs(cfg, n, seed)
    cls = _class(cfg)
    table = _table(labels, ids).shuffle(seed=seed)
    # the library's warnings are shown once it has succeeded: an input error
    # stays one line
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            partitioner = cls(**kwargs)
            partitioner.dataset = table
            count = partitioner.num_partitions
            if count != n:
                raise ConfigError(
                    f"federation.clients: {n}, but {cls.__name__} with "
                    f"data.partitioner-args makes {count} partitions; make them "
                    "agree"
                )
            parts = _rows(partitioner, count)
        except (ValueError, TypeError, KeyError, IndexError) as err:
            message = " ".join(str(err).split())
            raise ConfigError(
                f"data.partitioner-args: {cls.__name__} rejects them: {message}"
            ) from None
    for warning in said:
        warnings.warn_explicit(
            warning.message, warning.category, warning.filename, warning.lineno
        )
    empty = [i for i, rows in enumerate(parts) if len(rows) == 0]
    if empty:
        raise ConfigError(
            f"data.partitioner-args: {cls.__name__} leaves client {empty[0]} "
            f"without rows ({len(empty)} clients empty); change its arguments or "
            "federation.clients"
        )
    return parts


def partition_indices(
    labels: np.ndarray,
    cfg: DataConfig,
    num_partitions: int,
    seed: int,
    ids: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Row indices of each client's partition, from a flwr-datasets partitioner
    (``ids``: the ``data.partition-by`` column, when set)."""
    if cfg.partition_by and cfg.partition_by != cfg.label_column and ids is None:
        raise ValueError("data.partition-by is set: pass its column as ids")
    if cfg.partitioner == "natural-id":
        return natural_id(cfg, labels if ids is None else ids, num_partitions, seed)
    if cfg.partitioner not in registry.OWN_KEYS_PARTITIONERS:
        return _by_args(cfg, labels, ids, num_partitions, seed)
    partitioner = _legacy(cfg, num_partitions, seed)
    partitioner.dataset = _table(labels, None)
    try:
        parts = _rows(partitioner, num_partitions)
    except ValueError as err:
        raise ConfigError(
            f"data.partitioner: {cfg.partitioner!r} failed: {err}"
        ) from None
    if cfg.partitioner == "iid":
        # IidPartitioner takes contiguous shards: map them through a seeded
        # permutation so that each shard is a uniform random sample.
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(labels))
        parts = [order[p] for p in parts]
    return parts
