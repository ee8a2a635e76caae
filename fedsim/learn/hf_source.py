"""Hugging Face datasets as fedsim reads them (``data.dataset = "hf:NAME"``).

``NAME`` is one of:

- a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``:
  read with ``datasets.load_from_disk`` (Arrow files, memory-mapped); a
  ``DatasetDict`` folder's splits are chosen by ``data.split`` /
  ``data.test-split``; a ``Dataset`` folder is one split, so neither applies;
- anything ``datasets.load_dataset`` reads: a hub name or a local folder of data
  files, or a builder such as ``parquet`` with ``data.path`` as its data files;
  ``data.subset`` is its config name.

``data.split`` is the split the clients train on; ``data.test-split`` (optional)
is the dataset's own test split, used whole as the server's global test set.
Labels are encoded over both splits together, so a class missing from one
split keeps its index.

Features: an ``Image`` column becomes ``(channels, height, width)`` floats in
[0, 1], decoded on demand (:class:`ImageRows`) so that a dataset larger than
memory is converted in batches; otherwise the numeric columns are the features
(read whole). The ``data.partition-by`` column is never a feature: its values
go to :attr:`fedsim.learn.data.Arrays.ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig
from fedsim.learn.arrays import Arrays, DatasetInfo
from fedsim.learn.tables import from_table, labels

#: Files by which ``load_from_disk`` recognises a DatasetDict / a Dataset folder.
_DICT_FILE = "dataset_dict.json"
_DATASET_FILE = "state.json"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def saved_to_disk(name: str) -> bool:
    """Whether ``name`` is a folder written by ``save_to_disk``."""
    folder = Path(name)
    return (folder / _DICT_FILE).is_file() or (folder / _DATASET_FILE).is_file()


def open_splits(cfg: DataConfig) -> tuple[Any, Any | None]:
    """The training split and the test split (None without ``data.test-split``),
    as ``datasets.Dataset`` objects; every bad name is a one-line ConfigError."""
    import datasets

    name = cfg.dataset.removeprefix("hf:")
    if saved_to_disk(name):
        if cfg.subset:
            raise ConfigError(
                f"data.subset: {name} is a save_to_disk folder, which has no "
                "configs; leave data.subset empty"
            )
        try:
            loaded = datasets.load_from_disk(name)
        except Exception as err:  # the datasets library raises many types
            raise ConfigError(
                f"data.dataset: cannot load the save_to_disk folder {name}: "
                f"{_one_line(err)}"
            ) from None
        if isinstance(loaded, datasets.Dataset):
            if cfg.test_split:
                raise ConfigError(
                    f"data.test-split: {name} holds one Dataset (saved with "
                    "Dataset.save_to_disk), which has no splits; leave "
                    "data.test-split empty or save a DatasetDict"
                )
            return loaded, None
        return _pick(loaded, cfg, name)
    kwargs: dict[str, Any] = {}
    if cfg.path:
        kwargs["data_files"] = cfg.path
    try:
        loaded = datasets.load_dataset(name, cfg.subset or None, **kwargs)
    except Exception as err:  # the datasets library raises many types
        message = _one_line(err)
        if cfg.subset and "config" in message.lower():
            raise ConfigError(
                f"data.subset: {cfg.subset!r} is not a config of {name}: {message}"
            ) from None
        raise ConfigError(f"data.dataset: cannot load {name!r}: {message}") from None
    return _pick(loaded, cfg, name)


def _pick(splits: Any, cfg: DataConfig, name: str) -> tuple[Any, Any | None]:
    known = list(splits)
    for key, split in (("split", cfg.split), ("test-split", cfg.test_split)):
        if split and split not in splits:
            raise ConfigError(
                f"data.{key}: {split!r} is not a split of {name}; splits: "
                + ", ".join(known)
            )
    return splits[cfg.split], splits[cfg.test_split] if cfg.test_split else None


def _image_array(images: Sequence[Any]) -> np.ndarray:
    pixels = [np.asarray(img) for img in images]
    if all(p.dtype == np.uint8 for p in pixels):  # 8-bit images: one conversion
        x = np.stack(pixels).astype(np.float32) / 255.0
    else:
        x = np.stack([np.asarray(p, dtype=np.float32) for p in pixels]) / 255.0
    if x.ndim == 3:
        return x.reshape(len(x), 1, *x.shape[1:])
    return np.moveaxis(x, -1, 1)


class ImageRows:
    """An ``Image`` column as float32 ``(n, channels, height, width)`` in [0, 1],
    decoded on demand: ``rows[index]`` decodes only the rows of ``index`` (an
    array of row numbers), so a dataset larger than memory is converted in
    batches. ``np.asarray(rows)`` decodes all of it."""

    def __init__(self, dataset: Any, column: str) -> None:
        self._dataset = dataset.select_columns([column]).with_format("arrow")
        self._column = column
        self._feature = dataset.features[column]
        first = self._decode(np.arange(1))
        self.shape: tuple[int, ...] = (len(dataset), *first.shape[1:])
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = np.arange(len(self))[index]
        if rows.ndim == 0:
            return self[rows[None]][0]
        if len(rows) == 0:
            return np.zeros((0, *self.shape[1:]), np.float32)
        return self._decode(rows)

    def _decode(self, rows: np.ndarray) -> np.ndarray:
        # the stored {bytes, path} values straight from Arrow, decoded by the
        # feature's own decode_example: what indexing the dataset does, without
        # its per-row formatting (half the time of a FEMNIST-sized conversion)
        values = self._dataset[rows.tolist()][self._column].to_pylist()
        return _image_array([self._feature.decode_example(v) for v in values])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)


def _column(ds: Any, column: str, key: str, name: str) -> np.ndarray:
    if column not in ds.column_names:
        raise ConfigError(
            f"data.{key}: {column!r} is not a column of {name}; columns: "
            f"{', '.join(ds.column_names)}"
        )
    # one Arrow -> Python conversion of the column, not a formatted row each
    return np.asarray(ds.with_format("arrow")[column].to_pylist())


def _encode(values: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return np.searchsorted(classes, values).astype(np.int64)


def _convert(
    ds: Any,
    cfg: DataConfig,
    name: str,
    classes: np.ndarray | None,
    *,
    partitioned: bool = True,
) -> tuple[Arrays, DatasetInfo]:
    """One split as :class:`Arrays` (``classes``: the label values of both
    splits, which fix the encoding; None: this split's own; ``partitioned``:
    the split must hold the ``data.partition-by`` column)."""
    import datasets

    ids = None
    by = cfg.partition_by
    if by and by != cfg.label_column and (partitioned or by in ds.column_names):
        ids = _column(ds, by, "partition-by", name)
        ds = ds.remove_columns([by])  # never a feature
    images = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if images:
        raw = _column(ds, cfg.label_column, "label-column", name)
        y, num_classes = labels(raw, name, cfg)
        if classes is not None:
            y, num_classes = _encode(raw, classes), len(classes)
        x: Any = ImageRows(ds, images[0])
        return Arrays(x, y, ids), DatasetInfo(tuple(x.shape[1:]), num_classes)
    columns = {c: _column(ds, c, "label-column", name) for c in ds.column_names}
    x, y, num_classes = from_table(columns, cfg, name)
    if classes is not None:
        y, num_classes = _encode(columns[cfg.label_column], classes), len(classes)
    return Arrays(x, y, ids), DatasetInfo((x.shape[1],), num_classes)


def _classes(train: Any, test: Any, cfg: DataConfig, name: str) -> np.ndarray:
    """Label values of both splits, sorted (the encoding both splits share)."""
    both = [_column(ds, cfg.label_column, "label-column", name) for ds in (train, test)]
    for split, values in zip((cfg.split, cfg.test_split), both, strict=True):
        labels(values, f"{name} (split {split!r})", cfg)  # no empty labels
    return np.unique(np.concatenate(both))


def load_hf(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """The training split (``data.split``) of a Hugging Face dataset."""
    name = cfg.dataset.removeprefix("hf:")
    train, test = open_splits(cfg)
    classes = None if test is None else _classes(train, test, cfg, name)
    return _convert(train, cfg, name, classes)


def load_hf_test(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """The test split (``data.test-split``), labels encoded as in :func:`load_hf`."""
    name = cfg.dataset.removeprefix("hf:")
    train, test = open_splits(cfg)
    if test is None:
        raise ValueError("load_hf_test needs data.test-split")
    classes = _classes(train, test, cfg, name)
    return _convert(test, cfg, name, classes, partitioned=False)
