"""Datasets, partitioning among clients, and per-client / global splits.

Every dataset is loaded into numpy arrays ``x`` (float32, shape ``(n, *input_shape)``)
and ``y`` (int64 class indices). A seeded, stratified slice becomes the global test
set for server-side evaluation; ``flwr-datasets`` partitioners split the rest among
clients; each client's partition is split again into its local train and test sets.
A process builds this once (:func:`federated_data` is cached) and hands clients
views of the arrays.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig
from fedsim.learn.tables import from_table, labels


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data."""

    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class Arrays:
    """Features and labels of one split."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Arrays:
        return Arrays(self.x[index], self.y[index])


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test splits."""

    partition_id: int
    train: Arrays
    test: Arrays


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
    x, y, num_classes = from_table(columns, cfg, str(path))
    return Arrays(x, y), DatasetInfo((x.shape[1],), num_classes)


def _image_array(images: Sequence[Any]) -> np.ndarray:
    x = np.stack([np.asarray(img, dtype=np.float32) for img in images]) / 255.0
    if x.ndim == 3:
        return x.reshape(len(x), 1, *x.shape[1:])
    return np.moveaxis(x, -1, 1)


def load_hf(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """A Hugging Face dataset via ``datasets.load_dataset(NAME, split=...)``.

    ``NAME`` is a hub name or a local path (a folder of data files, or a builder
    such as ``parquet`` with ``data.path`` as its data files). An ``Image`` column
    becomes ``(channels, height, width)`` inputs scaled to [0, 1]; otherwise the
    numeric columns are the features.
    """
    import datasets

    name = cfg.dataset.removeprefix("hf:")
    kwargs: dict[str, Any] = {"split": cfg.split}
    if cfg.path:
        kwargs["data_files"] = cfg.path
    try:
        ds = datasets.load_dataset(name, **kwargs)
    except Exception as err:  # the datasets library raises many types
        raise ConfigError(f"data.dataset: cannot load {name!r}: {err}") from None
    images = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if images:
        if cfg.label_column not in ds.column_names:
            raise ConfigError(
                f"data.label-column: {cfg.label_column!r} is not a column; "
                f"columns: {', '.join(ds.column_names)}"
            )
        x = _image_array(ds[images[0]])
        y, num_classes = labels(np.asarray(ds[cfg.label_column]), name, cfg)
        return Arrays(x, y), DatasetInfo(tuple(x.shape[1:]), num_classes)
    columns = {c: np.asarray(ds[c]) for c in ds.column_names}
    x, y, num_classes = from_table(columns, cfg, name)
    return Arrays(x, y), DatasetInfo((x.shape[1],), num_classes)


@lru_cache(maxsize=4)
def load_arrays(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """Load the configured dataset (cached per process); with ``data.format`` or
    ``data.text-column`` set, its text rows (:mod:`fedsim.learn.text`)."""
    text = bool(cfg.format or cfg.text_column)
    entry = registry.TEXT_ROWS if text else registry.dataset_entry(cfg.dataset)
    loader = entry.load()
    return loader(cfg, seed)  # type: ignore[no-any-return]


def _partitioner(cfg: DataConfig, num_partitions: int, seed: int) -> Any:
    cls = registry.PARTITIONERS[cfg.partitioner].load()
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


def partition_indices(
    labels: np.ndarray, cfg: DataConfig, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Row indices of each client's partition, from a flwr-datasets partitioner."""
    import datasets

    table = datasets.Dataset.from_dict(
        {"label": labels.tolist(), "row": list(range(len(labels)))}
    )
    partitioner = _partitioner(cfg, num_partitions, seed)
    partitioner.dataset = table
    try:
        parts = [
            np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
            for i in range(num_partitions)
        ]
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


def cache_dir() -> Path:
    """Where fedsim caches derived data (``FEDSIM_CACHE``, else ~/.cache/fedsim)."""
    return Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim"))


#: Bump when the cached layout or the splitting changes.
_CACHE_FORMAT = 2


def _source_fingerprint(cfg: DataConfig) -> str | None:
    """What the loaded data depends on beyond ``cfg``: size and modification
    time of every local file it reads; None when it reads something that cannot
    be fingerprinted here (a dataset on the Hugging Face hub)."""
    hub = cfg.dataset.removeprefix("hf:") if cfg.dataset.startswith("hf:") else ""
    sources = [Path(p) for p in (cfg.path, hub) if p]
    if hub and not Path(hub).exists():
        return None
    parts = []
    for source in sources:
        files = sorted(source.rglob("*")) if source.is_dir() else [source]
        for file in files:
            with suppress(OSError):
                stat = file.stat()
                parts.append(f"{file}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def _cache_path(cfg: DataConfig, num_clients: int, seed: int) -> Path | None:
    fingerprint = _source_fingerprint(cfg)
    if fingerprint is None:
        return None
    key = hashlib.sha256(
        repr((_CACHE_FORMAT, cfg, num_clients, seed, fingerprint)).encode()
    )
    return cache_dir() / "data" / f"{key.hexdigest()[:32]}.npz"


@dataclass(frozen=True)
class FederatedData:
    """The global test set and every client's partition, built once per process."""

    info: DatasetInfo
    pool: Arrays
    test: Arrays
    partitions: tuple[np.ndarray, ...]
    client_test_fraction: float
    seed: int

    def client(self, partition_id: int) -> ClientData:
        """Local train/test split of one client (seeded by the partition id)."""
        rows = self.partitions[partition_id]
        rng = np.random.default_rng([self.seed, partition_id])
        rows = rng.permutation(rows)
        n_test = int(round(len(rows) * self.client_test_fraction))
        if len(rows) >= 2:
            n_test = min(max(n_test, 1), len(rows) - 1)
        return ClientData(
            partition_id,
            self.pool.subset(np.sort(rows[n_test:])),
            self.pool.subset(np.sort(rows[:n_test])),
        )


@lru_cache(maxsize=4)
def federated_data(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Split the dataset into a global test set and ``num_clients`` partitions.

    The result is cached on disk (:func:`cache_dir`), keyed by the data config,
    the number of clients, the seed and the size and modification time of the
    local files read: the CLI's pre-run check builds it once, and the ServerApp
    and every Ray actor read it back without the loaders, the splitter and the
    partitioner (nor their imports: scikit-learn, pandas, ``datasets``).
    """
    path = _cache_path(cfg, num_clients, seed)
    cached = _read_cached(path, cfg, num_clients, seed) if path is not None else None
    if cached is not None:
        return cached
    built = _split(cfg, num_clients, seed)
    if path is not None:
        _save(path, built)
    return built


#: What reading a damaged cache entry raises (truncated, emptied, bytes flipped).
_DAMAGE = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)


def _read_cached(
    path: Path, cfg: DataConfig, num_clients: int, seed: int
) -> FederatedData | None:
    """The cache entry at ``path``, or None when there is none or it is damaged:
    a damaged entry is removed (the caller rebuilds it) and the user told in one
    line on stderr."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as saved:  # zip CRCs are checked as each entry is read
            info = DatasetInfo(
                tuple(int(d) for d in saved["input_shape"]), int(saved["num_classes"])
            )
            parts = tuple(saved[f"p{i}"] for i in range(num_clients))
            return FederatedData(
                info,
                Arrays(saved["pool_x"], saved["pool_y"]),
                Arrays(saved["test_x"], saved["test_y"]),
                parts,
                cfg.client_test_fraction,
                seed,
            )
    except _DAMAGE as err:
        print(
            f"fedsim: data cache entry {path} is damaged "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else '-'}); "
            "rebuilding it",
            file=sys.stderr,
        )
        with suppress(OSError):
            path.unlink()
        return None


def _save(path: Path, data: FederatedData) -> None:
    """Write atomically: concurrent actors may build the same entry. A cache
    that cannot be written (read-only, no space) means no caching."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arrays = {
        "input_shape": np.asarray(data.info.input_shape, dtype=np.int64),
        "num_classes": np.asarray(data.info.num_classes),
        "pool_x": data.pool.x,
        "pool_y": data.pool.y,
        "test_x": data.test.x,
        "test_y": data.test.y,
        **{f"p{i}": p for i, p in enumerate(data.partitions)},
    }
    with suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    with suppress(OSError):
        tmp.unlink()


def _split(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    from sklearn.model_selection import train_test_split

    arrays, info = load_arrays(cfg, seed)
    index = np.arange(len(arrays))
    counts = np.bincount(arrays.y)
    stratify = arrays.y if counts.min() >= 2 else None
    pool_idx, test_idx = train_test_split(
        index, test_size=cfg.test_fraction, random_state=seed, stratify=stratify
    )
    pool = arrays.subset(np.sort(pool_idx))
    test = arrays.subset(np.sort(test_idx))
    if num_clients > len(pool):
        raise ConfigError(
            f"federation.clients: {num_clients} exceeds the {len(pool)} training "
            "examples"
        )
    parts = partition_indices(pool.y, cfg, num_clients, seed)
    return FederatedData(info, pool, test, tuple(parts), cfg.client_test_fraction, seed)
