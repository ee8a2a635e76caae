"""Datasets, flwr-datasets partitioners, splits and seeding."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig
from fedsim.learn.data import federated_data, load_arrays, partition_indices


def labels(n_per_class: int = 60, classes: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(classes), n_per_class))


def class_share(parts: list[np.ndarray], y: np.ndarray, classes: int) -> np.ndarray:
    """Per-client label distributions (rows sum to 1)."""
    counts = np.stack([np.bincount(y[p], minlength=classes) for p in parts])
    return counts / counts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_the_data_exactly_once(partitioner: str) -> None:
    y = labels()
    cfg = DataConfig(partitioner=partitioner, alpha=0.5, min_partition_size=5)
    # 10 clients: 'first-deterministic' pathological assignment uses every class
    parts = partition_indices(y, cfg, 10, seed=1)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert len(joined) == len(y) and len(np.unique(joined)) == len(y)


def test_iid_sizes_are_balanced_and_labels_mixed() -> None:
    y = np.sort(labels())  # sorted labels: contiguous shards would be one class each
    parts = partition_indices(y, DataConfig(partitioner="iid"), 10, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    share = class_share(parts, y, 10)
    assert (share > 0).sum(axis=1).min() >= 8  # every client sees most classes


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = labels(100)
    uniform = np.full(10, 0.1)

    def skew(alpha: float) -> float:
        cfg = DataConfig(partitioner="dirichlet", alpha=alpha, min_partition_size=5)
        share = class_share(partition_indices(y, cfg, 10, seed=3), y, 10)
        return float(np.abs(share - uniform).sum(axis=1).mean())  # mean L1 to uniform

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.3


def test_pathological_gives_each_client_k_classes() -> None:
    y = labels()
    cfg = DataConfig(partitioner="pathological", classes_per_client=2)
    parts = partition_indices(y, cfg, 10, seed=0)
    for p in parts:
        assert len(np.unique(y[p])) in (1, 2)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_seeded(partitioner: str) -> None:
    y = labels()
    cfg = DataConfig(partitioner=partitioner, min_partition_size=5)
    a = partition_indices(y, cfg, 6, seed=5)
    b = partition_indices(y, cfg, 6, seed=5)
    c = partition_indices(y, cfg, 6, seed=6)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_federated_splits_are_disjoint_and_stratified() -> None:
    cfg = DataConfig(dataset="digits", partitioner="dirichlet", alpha=0.5)
    data = federated_data(cfg, 10, 0)
    arrays, info = load_arrays(cfg, 0)
    assert info.input_shape == (1, 8, 8) and info.num_classes == 10
    assert len(data.test) == math.ceil(0.2 * len(arrays))
    # stratified: every class's share in the test set matches the whole set
    whole = np.bincount(arrays.y) / len(arrays)
    test = np.bincount(data.test.y) / len(data.test)
    assert np.abs(whole - test).max() < 0.01
    seen = 0
    for pid in range(10):
        client = data.client(pid)
        assert len(client.train) + len(client.test) == len(data.partitions[pid])
        assert len(client.test) >= 1
        seen += len(client.train) + len(client.test)
        again = data.client(pid)
        assert np.array_equal(client.train.x, again.train.x)
    assert seen + len(data.test) == len(arrays)
    # no example is in both a client split and the global test set
    pool_rows = {row.tobytes() for row in data.test.x.reshape(len(data.test), -1)}
    client = data.client(0)
    overlap = [
        r
        for r in client.train.x.reshape(len(client.train), -1)
        if r.tobytes() in pool_rows
    ]
    assert len(overlap) <= 2  # digits has a few duplicate images, not more


def test_synthetic_dataset_is_configurable_and_seeded() -> None:
    cfg = DataConfig(dataset="synthetic", size=300, classes=4, features=8)
    arrays, info = load_arrays(cfg, 1)
    assert arrays.x.shape == (300, 8) and info == dataclasses.replace(
        info, input_shape=(8,)
    )
    assert set(np.unique(arrays.y)) == {0, 1, 2, 3}
    again = load_arrays(dataclasses.replace(cfg), 1)[0]
    assert np.array_equal(arrays.x, again.x)
    other = load_arrays(cfg, 2)[0]
    assert not np.array_equal(arrays.x, other.x)


def table(n: int = 90) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "f1": rng.normal(size=n),
            "f2": rng.normal(size=n),
            "name": ["x"] * n,  # non-numeric columns are not features
            "species": rng.choice(["a", "b", "c"], size=n),
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_local_files(tmp_path: Path, suffix: str) -> None:
    frame = table()
    path = tmp_path / f"data{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    cfg = DataConfig(dataset="file", path=str(path), label_column="species")
    arrays, info = load_arrays(cfg, 0)
    assert info.input_shape == (2,) and info.num_classes == 3
    np.testing.assert_allclose(arrays.x[:, 0], frame["f1"].to_numpy(), rtol=1e-6)
    codes = {"a": 0, "b": 1, "c": 2}
    assert arrays.y.tolist() == [codes[s] for s in frame["species"]]


def test_local_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.path: file not found"):
        load_arrays(DataConfig(dataset="file", path=str(tmp_path / "x.csv")), 0)
    path = tmp_path / "d.csv"
    table().to_csv(path, index=False)
    with pytest.raises(ConfigError, match="data.label-column: 'label' is not a column"):
        load_arrays(DataConfig(dataset="file", path=str(path)), 0)


def test_hugging_face_loader_on_a_local_parquet_folder(tmp_path: Path) -> None:
    folder = tmp_path / "tabular"
    folder.mkdir()
    frame = table()
    frame.to_parquet(folder / "train.parquet")
    cfg = DataConfig(dataset=f"hf:{folder}", label_column="species", split="train")
    arrays, info = load_arrays(cfg, 0)
    assert info.num_classes == 3 and arrays.x.shape == (len(frame), 2)


def test_hugging_face_image_dataset(tmp_path: Path) -> None:
    """An Image feature becomes (channels, height, width) floats in [0, 1]."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8)
    ds = datasets.Dataset.from_dict(
        {
            "img": [Image.fromarray(p) for p in pixels],
            "label": [i % 3 for i in range(12)],
        }
    ).cast_column("img", datasets.Image())
    ds.to_parquet(str(tmp_path / "train.parquet"))
    cfg = DataConfig(
        dataset="hf:parquet", path=str(tmp_path / "train.parquet"), split="train"
    )
    arrays, info = load_arrays(cfg, 0)
    assert info.input_shape == (1, 6, 5) and info.num_classes == 3
    np.testing.assert_allclose(arrays.x[:, 0], pixels / 255.0, rtol=1e-6)


def test_unloadable_hugging_face_dataset_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.dataset: cannot load"):
        load_arrays(DataConfig(dataset=f"hf:{tmp_path / 'missing'}"), 0)


def test_too_many_clients_is_a_config_error() -> None:
    cfg = DataConfig(dataset="synthetic", size=20, partitioner="iid")
    with pytest.raises(ConfigError, match="federation.clients: 50 exceeds"):
        federated_data(cfg, 50, 0)


def test_federated_data_is_cached_on_disk_and_misses_on_a_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsim.learn import data as data_module

    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d.csv"
    table(120).to_csv(path, index=False)
    cfg = DataConfig(dataset="file", path=str(path), label_column="species")
    built = data_module._split(cfg, 4, 3)  # noqa: SLF001 (the uncached oracle)
    first = data_module.federated_data.__wrapped__(cfg, 4, 3)
    entries = [p for p in (tmp_path / "cache" / "data").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no leftovers
    calls: list[int] = []

    def rebuilt(*args: object) -> None:
        calls.append(1)
        raise LookupError("rebuilt")

    monkeypatch.setattr(data_module, "_plan", rebuilt)
    again = data_module.federated_data.__wrapped__(cfg, 4, 3)  # read back
    assert calls == []
    for got in (first, again):
        assert got.info == built.info
        assert isinstance(got.pool.x, np.memmap)  # mapped, not read whole
        np.testing.assert_array_equal(got.pool.x, built.pool.x)
        assert got.pool.x.strides == built.pool.x.strides
        np.testing.assert_array_equal(got.test.y, built.test.y)
        for a, b in zip(got.partitions, built.partitions, strict=True):
            np.testing.assert_array_equal(a, b)
    table(150).to_csv(path, index=False)  # new content: the key changes
    with pytest.raises(LookupError, match="rebuilt"):  # a miss
        data_module.federated_data.__wrapped__(cfg, 4, 3)
    assert calls == [1]


def test_rows_copied_from_a_cache_file_equal_numpy_indexing_and_are_not_mapped(
    tmp_path: Path,
) -> None:
    """``take`` reads a memory-mapped ``.npy`` file's rows with ``preadv``:
    the oracle is numpy's own fancy indexing of the map (bytes, dtype,
    strides); the map's pages stay out of the process (its resident size in
    /proc/self/smaps stays 0), while indexing through the map pages them in."""
    import psutil

    from fedsim.learn.arrays import take

    rng = np.random.default_rng(0)
    cases = [
        rng.random((3000, 1, 8, 8)).astype(np.float32),
        rng.random((40, 3)),
        np.arange(12),
        np.array(["a", "bcd", "ef"] * 4),
    ]
    for n, arr in enumerate(cases):
        file = tmp_path / f"a{n}.npy"
        np.save(file, arr)
        mapped = np.load(file, mmap_mode="c")
        picks = [
            np.arange(0),
            np.arange(len(arr)),
            np.sort(rng.choice(len(arr), len(arr) // 2, replace=False)),
            np.array([3, 1, 1, -1]),
        ]
        for index in picks:
            got, want = take(mapped, index), np.asarray(mapped[index])
            assert type(got) is np.ndarray and got.dtype == want.dtype
            assert got.shape == want.shape and got.strides == want.strides
            assert got.tobytes() == want.tobytes()
        assert np.array_equal(take(mapped[5:], np.array([0, 2])), arr[[5, 7]])

    def resident(path: Path) -> int:
        return sum(m.rss for m in psutil.Process().memory_maps() if m.path == str(path))

    big = tmp_path / "big.npy"
    np.save(big, cases[0])
    mapped = np.load(big, mmap_mode="c")
    take(mapped, np.arange(len(mapped)))
    assert resident(big) == 0
    np.asarray(mapped[np.arange(len(mapped))])
    assert resident(big) > 0


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9])
def test_train_size_counts_what_client_gives_without_reading_rows(
    fraction: float,
) -> None:
    """The pre-run check counts each client's training rows from the partition
    sizes (no row is read); the count equals the split :meth:`client` makes,
    for partitions of 0, 1, 2 and many rows."""
    from fedsim.learn.arrays import Arrays
    from fedsim.learn.data import FederatedData

    pool = Arrays(np.arange(60, dtype=np.float32).reshape(30, 2), np.arange(30) % 3)
    sizes = [0, 1, 2, 3, 7, 17]
    bounds = np.cumsum([0, *sizes])
    data = FederatedData(
        info=None,  # type: ignore[arg-type]
        pool=pool,
        test=pool,
        partitions=tuple(np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])),
        client_test_fraction=fraction,
        seed=3,
    )
    for pid in range(len(sizes)):
        assert data.train_size(pid) == len(data.client(pid).train.y), (pid, fraction)
