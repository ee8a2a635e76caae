"""The on-disk cache of a federation's data, read memory-mapped.

One entry per (data config, number of clients, seed, local source files' sizes
and modification times) -- the key of :func:`entry_path` -- is a folder of
``.npy`` files:

- ``pool_x.npy``, ``pool_y.npy``: the training pool, the rows clients draw from;
- ``test_x.npy``, ``test_y.npy``: the server's global test set;
- ``rows.npy``, ``offsets.npy``: every client's partition (row numbers into the
  pool), concatenated; client ``i`` holds ``rows[offsets[i]:offsets[i + 1]]``;
- ``meta.json`` (written last): the format, input shape and number of classes,
  and each file's size and xxh3 checksum.

A damaged entry (a file truncated, emptied or altered: its size or checksum
disagrees with ``meta.json``, or it does not load) is reported in one line on
stderr, moved aside and rebuilt by the caller. Checking reads each file once
per process (xxh3 runs at several GB/s; the pages land in the shared page cache
that the memory maps then use).

Readers map the arrays (``np.load(mmap_mode="c")``): a process pages in only
the rows it reads, and processes reading the same rows share the pages, so the
ServerApp and every Ray actor no longer hold a copy of the whole dataset (a
client's partition is copied out when it trains). The writer fills the features
in batches from the loaded source (which may decode rows on demand) and writes
them with ``write``, not through a memory map, so building an entry never holds
the dataset twice, nor its written pages in the builder's resident memory; it
writes into a private folder and renames it into place, so concurrent builders
and readers never see half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import xxhash

from fedsim.core.experiment import DataConfig
from fedsim.learn.arrays import Arrays, DatasetInfo

#: Bump when the cached layout or the splitting changes.
FORMAT = 3
_META = "meta.json"
#: Bytes of features copied per batch while writing an entry.
_BATCH_BYTES = 64 << 20


def cache_dir() -> Path:
    """Where fedsim caches derived data (``FEDSIM_CACHE``, else ~/.cache/fedsim)."""
    return Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim"))


def source_fingerprint(cfg: DataConfig) -> str | None:
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


def entry_path(cfg: DataConfig, num_clients: int, seed: int) -> Path | None:
    """The cache folder of a federation's data (None: not cacheable)."""
    fingerprint = source_fingerprint(cfg)
    if fingerprint is None:
        return None
    key = hashlib.sha256(repr((FORMAT, cfg, num_clients, seed, fingerprint)).encode())
    return cache_dir() / "data" / key.hexdigest()[:32]


class Stored(NamedTuple):
    """A cache entry's contents (arrays memory-mapped)."""

    info: DatasetInfo
    pool: Arrays
    test: Arrays
    partitions: tuple[np.ndarray, ...]


def checksum(file: Path) -> str:
    """xxh3-64 of a file's bytes, read in 8 MiB chunks."""
    digest = xxhash.xxh3_64()
    with open(file, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _damaged(path: Path, why: str) -> None:
    """Tell the user in one line and move the entry out of the writer's way."""
    print(
        f"fedsim: data cache entry {path} is damaged ({why}); rebuilding it",
        file=sys.stderr,
    )
    aside = path.with_name(f".{path.name}.{os.getpid()}.damaged")
    with suppress(OSError):
        path.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)


def read(path: Path) -> Stored | None:
    """The entry at ``path``, memory-mapped; None when it is missing, or
    damaged (then it is reported and moved aside, and the caller rebuilds it)."""
    if not path.exists():
        return None
    try:
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
        for name, (size, digest) in meta["files"].items():
            file = path / name
            if file.stat().st_size != size or checksum(file) != digest:
                raise ValueError(f"{name} differs from what was written")

        def load(name: str) -> np.ndarray:
            return np.load(path / f"{name}.npy", mmap_mode="c", allow_pickle=False)

        pool = Arrays(load("pool_x"), load("pool_y"))
        test = Arrays(load("test_x"), load("test_y"))
        rows, offsets = load("rows"), np.load(path / "offsets.npy")
        if (
            meta.get("format") != FORMAT
            or len(pool.x) != len(pool.y)
            or len(test.x) != len(test.y)
            or len(offsets) != meta["partitions"] + 1
            or offsets[-1] != len(rows)
        ):
            raise ValueError("its arrays do not fit together")
    except (OSError, ValueError, KeyError, TypeError) as err:
        _damaged(path, " ".join(str(err).split()) or type(err).__name__)
        return None
    parts = tuple(rows[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True))
    info = DatasetInfo(tuple(meta["input_shape"]), int(meta["num_classes"]))
    return Stored(info, pool, test, parts)


def _copy_rows(file: Path, source: Any, rows: np.ndarray) -> None:
    """``source[rows]`` into a new ``.npy`` file, in batches, written with
    ``write`` rather than through a memory map: the written pages sit in the
    page cache, not in the writer's mapped (resident, proportional) memory."""
    shape = (len(rows), *source.shape[1:])
    dtype = np.dtype(source.dtype)
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": shape,
    }
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _BATCH_BYTES // row_bytes)
    with open(file, "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        for start in range(0, len(rows), step):
            batch = np.ascontiguousarray(source[rows[start : start + step]], dtype)
            out.write(batch.reshape(-1).view(np.uint8).data)


def write(
    path: Path,
    info: DatasetInfo,
    pool: tuple[Arrays, np.ndarray],
    test: tuple[Arrays, np.ndarray],
    partitions: Sequence[np.ndarray],
) -> bool:
    """Write an entry atomically: ``pool`` and ``test`` are (source, sorted row
    numbers) pairs whose rows are copied. False when it could not be written
    (a read-only cache, a full disk); True when the entry is in place (written
    here or, concurrently, by another process)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, (source, rows) in (("pool", pool), ("test", test)):
            _copy_rows(tmp / f"{name}_x.npy", source.x, rows)
            np.save(tmp / f"{name}_y.npy", np.asarray(source.y)[rows])
        sizes = [len(p) for p in partitions]
        joined = np.concatenate([np.asarray(p, np.int64) for p in partitions])
        np.save(tmp / "rows.npy", joined)
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(sizes)]))
        meta = {
            "format": FORMAT,
            "input_shape": list(info.input_shape),
            "num_classes": info.num_classes,
            "partitions": len(partitions),
            "files": {
                f.name: [f.stat().st_size, checksum(f)]
                for f in sorted(tmp.glob("*.npy"))
            },
        }
        (tmp / _META).write_text(json.dumps(meta), encoding="utf-8")
        try:
            tmp.rename(path)
        except OSError:  # another process put the entry in place first
            if not (path / _META).is_file():
                return False
        return True
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
