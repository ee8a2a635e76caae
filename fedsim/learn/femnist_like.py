"""A FEMNIST-shaped synthetic dataset that ships offline.

FEMNIST (LEAF; ``flwrlabs/femnist`` on the Hugging Face hub) holds ~800k 28x28
grey images of 62 classes by ~3,500 writers, with skewed per-writer counts, and
is partitioned by writer (``NaturalIdPartitioner(partition_by="writer_id")``).
:func:`write` builds a dataset of the same shape -- an ``Image`` column, a
``character`` class label, a ``writer_id`` string column, per-writer counts
drawn from a log-normal distribution -- and saves it with
``DatasetDict.save_to_disk`` (splits ``train`` and, optionally, ``test``: a
share of every writer's rows). Its images are learnable but not handwriting:
each class is a fixed random blob pattern; each writer shifts it by a few
pixels, scales its contrast and adds noise, and draws labels from a writer's
own Dirichlet mix of classes (label skew per writer, as real writers have).

Use: ``data.dataset = "hf:<folder>"``, ``data.label-column = "character"``,
``data.partitioner = "natural-id"``, ``data.partition-by = "writer_id"``.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

#: Images per generated batch (bounds the generator's memory).
_BATCH = 20_000


def writer_sizes(writers: int, mean: float, seed: int, minimum: int = 4) -> np.ndarray:
    """Rows per writer: log-normal (sigma 0.6) scaled to ``mean``, at least
    ``minimum`` (FEMNIST's counts are skewed, with a long upper tail)."""
    rng = np.random.default_rng([seed, 0])
    raw = rng.lognormal(mean=0.0, sigma=0.6, size=writers)
    return np.maximum(minimum, np.round(raw / raw.mean() * mean)).astype(np.int64)


def _templates(classes: int, side: int, seed: int) -> np.ndarray:
    """One smooth random pattern in [0, 1] per class."""
    rng = np.random.default_rng([seed, 1])
    coarse = rng.random((classes, 7, 7))
    big = np.kron(coarse, np.ones((side // 7 + 1, side // 7 + 1)))[:, :side, :side]
    return (big > 0.55).astype(np.float32)


def _labels(sizes: np.ndarray, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Each writer's labels, from the writer's own Dirichlet(0.5) mix of classes."""
    labels = np.empty(int(sizes.sum()), np.int64)
    start = 0
    for size in sizes:
        mix = rng.dirichlet(np.full(classes, 0.5))
        labels[start : start + size] = rng.choice(classes, size=size, p=mix)
        start += size
    return labels


def image_batches(
    sizes: np.ndarray, classes: int, side: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """uint8 images ``(n, side, side)``, labels and writer numbers, writer by
    writer (rows of one writer are contiguous, as in FEMNIST), in batches of
    ``_BATCH`` rows: a writer's pattern shift picks one of the 25 shifted
    copies of the class templates (no per-image work), and the noise is drawn
    batch by batch, so the generator's memory does not grow with the dataset."""
    rng = np.random.default_rng([seed, 2])
    templates = _templates(classes, side, seed)
    labels = _labels(sizes, classes, rng)
    writer = np.repeat(np.arange(len(sizes)), sizes)
    shift = rng.integers(-2, 3, size=(len(sizes), 2))
    contrast = rng.uniform(0.6, 1.0, size=len(sizes))[writer]
    # shifted[(dy + 2) * 5 + dx + 2, c] = np.roll(templates[c], (dy, dx), (0, 1))
    shifted = np.stack(
        [
            np.roll(templates, (dy, dx), axis=(1, 2))
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        ]
    )
    which = ((shift[:, 0] + 2) * 5 + shift[:, 1] + 2)[writer]
    for a in range(0, len(writer), _BATCH):
        b = min(a + _BATCH, len(writer))
        x = shifted[which[a:b], labels[a:b]]
        x = x * contrast[a:b, None, None] + rng.normal(0, 0.15, x.shape)
        yield np.clip(x * 255, 0, 255).astype(np.uint8), labels[a:b], writer[a:b]


def images_and_labels(
    sizes: np.ndarray, classes: int, side: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`image_batches` joined: all images, labels and writer numbers."""
    batches = list(image_batches(sizes, classes, side, seed))
    return tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))  # type: ignore[return-value]


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def pngs(images: np.ndarray) -> list[bytes]:
    """uint8 grey images ``(n, h, w)`` as PNG files (8-bit greyscale, filter
    0, zlib level 1): the PNG format written directly, since Pillow's encoder
    costs ~0.2 ms an image (its per-row adaptive filters), a quarter of an
    hour for FEMNIST's 800k images; any PNG reader (Pillow, through
    ``datasets.Image``) decodes them to the same pixels."""
    n, height, width = images.shape
    raw = np.zeros((n, height, width + 1), np.uint8)  # a 0 filter byte per row
    raw[:, :, 1:] = images
    head = b"\x89PNG\r\n\x1a\n" + _chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    )
    tail = _chunk(b"IEND", b"")
    return [head + _chunk(b"IDAT", zlib.compress(r.tobytes(), 1)) + tail for r in raw]


def write(
    folder: str | Path,
    *,
    writers: int = 3_500,
    mean_rows: float = 226.0,
    classes: int = 62,
    side: int = 28,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Path:
    """Generate the dataset and save it to ``folder`` (``save_to_disk``).

    The rows are generated, PNG-encoded and appended to each split's Arrow
    file batch by batch (``datasets.arrow_writer.ArrowWriter``), so neither the
    images nor their encoding is ever held whole; ``save_to_disk`` then copies
    the memory-mapped splits into ``folder``.

    Parameters
    ----------
    writers, mean_rows : int, float
        Number of writers and their mean number of rows (FEMNIST: ~3,500 and
        ~226, ~800k images).
    classes, side : int
        Classes (FEMNIST: 62: digits, upper and lower case) and image side.
    test_fraction : float
        Share of each writer's rows in split ``test`` (0: ``train`` only).
    """
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    sizes = writer_sizes(writers, mean_rows, seed)
    test = np.random.default_rng([seed, 3]).random(int(sizes.sum())) < test_fraction
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "character": datasets.ClassLabel(num_classes=classes),
            "writer_id": datasets.Value("string"),
        }
    )
    names = np.asarray([f"f{w:04d}_{w % 100:02d}" for w in range(writers)])
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        split_names = ["train", "test"] if test_fraction else ["train"]
        files = {s: scratch / f"{s}.arrow" for s in split_names}
        sinks = {
            s: ArrowWriter(features=features, path=str(f)) for s, f in files.items()
        }
        start = 0
        for images, labels, writer in image_batches(sizes, classes, side, seed):
            in_test = test[start : start + len(labels)]
            start += len(labels)
            for split, sink in sinks.items():
                rows = np.flatnonzero(in_test if split == "test" else ~in_test)
                encoded = pa.array(pngs(images[rows]), pa.binary())
                image = pa.StructArray.from_arrays(
                    [encoded, pa.nulls(len(rows), pa.string())], names=["bytes", "path"]
                )
                table = pa.table(
                    {
                        "image": image,
                        "character": pa.array(labels[rows], pa.int64()),
                        "writer_id": pa.array(
                            names[writer[rows]].tolist(), pa.string()
                        ),
                    }
                )
                sink.write_table(table.cast(features.arrow_schema))
        for sink in sinks.values():
            sink.finalize()
            sink.close()
        splits = {s: datasets.Dataset.from_file(str(f)) for s, f in files.items()}
        datasets.DatasetDict(splits).save_to_disk(str(out))
        del splits
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out
