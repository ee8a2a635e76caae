"""Datasets, partitioning among clients, and per-client / global splits.

Every dataset is loaded into features ``x`` (float32, shape ``(n, *input_shape)``)
and ``y`` (int64 class indices). A seeded, stratified slice becomes the global test
set for server-side evaluation (or, with ``data.test-split``, a Hugging Face
dataset's own test split: :mod:`fedsim.learn.hf_source`); ``flwr-datasets``
partitioners split the rest among clients (:mod:`fedsim.learn.partitioners`);
each client's partition is split again into its local train and test sets. A
process builds this once (:func:`federated_data` is cached, on disk by
:mod:`fedsim.learn.data_cache` and read back memory-mapped) and hands clients
copies of their own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig
from fedsim.learn import data_cache, partitioners
from fedsim.learn.arrays import Arrays, ClientData, DatasetInfo
from fedsim.learn.data_cache import cache_dir
from fedsim.learn.hf_source import load_hf_test
from fedsim.learn.partitioners import partition_indices
from fedsim.learn.tables import from_table

__all__ = [
    "Arrays",
    "ClientData",
    "DatasetInfo",
    "FederatedData",
    "cache_dir",
    "federated_data",
    "load_arrays",
    "partition_indices",
]


def load_digits(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """scikit-learn's bundled digits: 1797 8x8 grey images scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    # reshape, not [:, None]: canonical strides, the same as the arrays read
    # back from the disk cache (torch's kernels may round differently otherwise)
    images = (bunch.images / 16.0).astype(np.float32)
    x = images.reshape(len(images), 1, *images.shape[1:])
    return Arrays(x, bunch.target.astype(np.int64)), DatasetInfo((1, 8, 8), 10)


def load_synthetic(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """Gaussian clusters from ``sklearn.datasets.make_classification``."""
    from sklearn.datasets import make_classification

    informative = max(2, min(cfg.features, cfg.classes * 2))
    while cfg.classes * 2 > 2**informative:
        informative += 1
    if informative > cfg.features:
        raise ConfigError(
            f"data.features: {cfg.features} is too few for {cfg.classes} classes"
        )
    x, y = make_classification(
        n_samples=cfg.size,
        n_features=cfg.features,
        n_informative=informative,
        n_redundant=0,
        n_classes=cfg.classes,
        n_clusters_per_class=2,
        class_sep=1.5,
        random_state=seed,
    )
    return (
        Arrays(x.astype(np.float32), y.astype(np.int64)),
        DatasetInfo((cfg.features,), cfg.classes),
    )


def load_file(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """A local CSV or Parquet table: numeric feature columns and a label column."""
    import pandas as pd

    path = Path(cfg.path)
    if path.is_dir():
        raise ConfigError(f"data.path: {path} is a directory; give a .csv or .parquet")
    if not path.is_file():
        raise ConfigError(f"data.path: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ConfigError(f"data.path: {path.name!r} must end in .csv, .parquet or .pq")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"data.path: {path} is empty") from None
    except (OSError, ValueError, pd.errors.ParserError) as err:
        message = " ".join(str(err).split())
        raise ConfigError(f"data.path: cannot read {path}: {message}") from None
    columns = {str(c): frame[c].to_numpy() for c in frame.columns}
    ids = None
    if cfg.partition_by and cfg.partition_by != cfg.label_column:
        if cfg.partition_by not in columns:
            raise ConfigError(
                f"data.partition-by: {cfg.partition_by!r} is not a column of "
                f"{path}; columns: {', '.join(columns)}"
            )
        ids = columns.pop(cfg.partition_by)  # never a feature
    x, y, num_classes = from_table(columns, cfg, str(path))
    return Arrays(x, y, ids), DatasetInfo((x.shape[1],), num_classes)


def _load(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """The configured dataset; with ``data.format`` or ``data.text-column`` set,
    its text rows (:mod:`fedsim.learn.text`)."""
    text = bool(cfg.format or cfg.text_column)
    loader = (
        registry.TEXT_ROWS if text else registry.dataset_entry(cfg.dataset)
    ).load()
    arrays, info = loader(cfg, seed)
    if cfg.partition_by and cfg.partition_by != cfg.label_column and arrays.ids is None:
        raise ConfigError(
            f"data.partition-by: {cfg.dataset!r} has no column "
            f"{cfg.partition_by!r}; its only column besides the features is the "
            f"label ({cfg.label_column!r})"
        )
    return arrays, info


@lru_cache(maxsize=4)
def load_arrays(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """Load the configured dataset whole into memory (cached per process)."""
    arrays, info = _load(cfg, seed)
    return Arrays(np.asarray(arrays.x), arrays.y, arrays.ids), info


@dataclass(frozen=True)
class FederatedData:
    """The global test set and every client's partition, built once per process."""

    info: DatasetInfo
    pool: Arrays
    test: Arrays
    partitions: tuple[np.ndarray, ...]
    client_test_fraction: float
    seed: int

    def local_test_size(self, partition_id: int) -> int:
        """How many of a client's rows its local test split holds."""
        size = len(self.partitions[partition_id])
        n_test = int(round(size * self.client_test_fraction))
        return min(max(n_test, 1), size - 1) if size >= 2 else n_test

    def train_size(self, partition_id: int) -> int:
        """How many training rows :meth:`client` gives, without reading them."""
        return len(self.partitions[partition_id]) - self.local_test_size(partition_id)

    def client(self, partition_id: int) -> ClientData:
        """Local train/test split of one client (seeded by the partition id)."""
        rows = self.partitions[partition_id]
        rng = np.random.default_rng([self.seed, partition_id])
        rows = rng.permutation(rows)
        n_test = self.local_test_size(partition_id)
        return ClientData(
            partition_id,
            self.pool.subset(np.sort(rows[n_test:])),
            self.pool.subset(np.sort(rows[:n_test])),
        )


@dataclass(frozen=True)
class _Plan:
    """Which rows of the loaded splits form the pool and the global test set,
    and each client's rows of the pool; nothing copied yet."""

    info: DatasetInfo
    source: Arrays
    pool_rows: np.ndarray
    test_source: Arrays
    test_rows: np.ndarray
    partitions: tuple[np.ndarray, ...]


def _take(source: Arrays, rows: np.ndarray) -> Arrays:
    return Arrays(np.asarray(source.x[rows]), np.asarray(source.y[rows]))


@lru_cache(maxsize=4)
def federated_data(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Split the dataset into a global test set and ``num_clients`` partitions.

    The result is cached on disk (:mod:`fedsim.learn.data_cache`), keyed by the
    data config, the number of clients, the seed and the size and modification
    time of the local files read, and read back memory-mapped: the CLI's
    pre-run check builds it once, and the ServerApp and every Ray actor map it
    without the loaders, the splitter and the partitioner (nor their imports:
    scikit-learn, pandas, ``datasets``) and page in only the rows they use.
    """
    path = data_cache.entry_path(cfg, num_clients, seed)
    stored = None if path is None else data_cache.read(path)
    if stored is None:
        plan = _plan(cfg, num_clients, seed)
        pool = (plan.source, plan.pool_rows)
        test = (plan.test_source, plan.test_rows)
        if path is not None and data_cache.write(
            path, plan.info, pool, test, plan.partitions
        ):
            stored = data_cache.read(path)
        if stored is None:  # not cacheable (a hub dataset), or the cache failed
            return _in_memory(plan, cfg, seed)
    return FederatedData(
        stored.info,
        stored.pool,
        stored.test,
        stored.partitions,
        cfg.client_test_fraction,
        seed,
    )


def _in_memory(plan: _Plan, cfg: DataConfig, seed: int) -> FederatedData:
    return FederatedData(
        plan.info,
        _take(plan.source, plan.pool_rows),
        _take(plan.test_source, plan.test_rows),
        plan.partitions,
        cfg.client_test_fraction,
        seed,
    )


def _split(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """The federation's data built in memory, without the cache."""
    return _in_memory(_plan(cfg, num_clients, seed), cfg, seed)


def _plan(cfg: DataConfig, num_clients: int, seed: int) -> _Plan:
    from sklearn.model_selection import train_test_split

    partitioners.check(cfg, num_clients, seed)
    source, info = _load(cfg, seed)
    if cfg.test_split:
        test_source, test_info = load_hf_test(cfg, seed)
        if test_info != info:
            raise ConfigError(
                f"data.test-split: split {cfg.test_split!r} has inputs of shape "
                f"{test_info.input_shape}, split {cfg.split!r} {info.input_shape}"
            )
        pool_rows, test_rows = np.arange(len(source)), np.arange(len(test_source))
    else:
        counts = np.bincount(source.y)
        stratify = source.y if counts.min() >= 2 else None
        pool_idx, test_idx = train_test_split(
            np.arange(len(source)),
            test_size=cfg.test_fraction,
            random_state=seed,
            stratify=stratify,
        )
        pool_rows, test_rows = np.sort(pool_idx), np.sort(test_idx)
        test_source = source
    if num_clients > len(pool_rows):
        raise ConfigError(
            f"federation.clients: {num_clients} exceeds the {len(pool_rows)} "
            "training examples"
        )
    ids = None if source.ids is None else source.ids[pool_rows]
    parts = partition_indices(source.y[pool_rows], cfg, num_clients, seed, ids)
    return _Plan(info, source, pool_rows, test_source, test_rows, tuple(parts))
