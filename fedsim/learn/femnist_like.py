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


def images_and_labels(
    sizes: np.ndarray, classes: int, side: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 images ``(n, side, side)``, labels and writer numbers, writer by
    writer (rows of one writer are contiguous, as in FEMNIST)."""
    rng = np.random.default_rng([seed, 2])
    templates = _templates(classes, side, seed)
    writer = np.repeat(np.arange(len(sizes)), sizes)
    labels = np.empty(len(writer), np.int64)
    start = 0
    for size in sizes:
        mix = rng.dirichlet(np.full(classes, 0.5))
        labels[start : start + size] = rng.choice(classes, size=size, p=mix)
        start += size
    shift = rng.integers(-2, 3, size=(len(sizes), 2))[writer]
    contrast = rng.uniform(0.6, 1.0, size=len(sizes))[writer]
    images = np.empty((len(writer), side, side), np.uint8)
    for a in range(0, len(writer), _BATCH):
        b = min(a + _BATCH, len(writer))
        x = templates[labels[a:b]]
        for i in range(b - a):
            x[i] = np.roll(x[i], tuple(shift[a + i]), axis=(0, 1))
        x = x * contrast[a:b, None, None] + rng.normal(0, 0.15, x.shape)
        images[a:b] = np.clip(x * 255, 0, 255).astype(np.uint8)
    return images, labels, writer


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

    sizes = writer_sizes(writers, mean_rows, seed)
    images, labels, writer = images_and_labels(sizes, classes, side, seed)
    rng = np.random.default_rng([seed, 3])
    test = rng.random(len(labels)) < test_fraction
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "character": datasets.ClassLabel(num_classes=classes),
            "writer_id": datasets.Value("string"),
        }
    )
    names = np.asarray([f"f{w:04d}_{w % 100:02d}" for w in range(writers)])
    splits = {}
    for split, rows in (("train", ~test), ("test", test)):
        if split == "test" and not test_fraction:
            continue
        index = np.flatnonzero(rows)
        parts = [
            datasets.Dataset.from_dict(
                {
                    "image": list(images[index[a : a + _BATCH]]),
                    "character": labels[index[a : a + _BATCH]].tolist(),
                    "writer_id": names[writer[index[a : a + _BATCH]]].tolist(),
                },
                features=features,
            )
            for a in range(0, len(index), _BATCH)
        ]
        splits[split] = datasets.concatenate_datasets(parts)
    out = Path(folder)
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out
