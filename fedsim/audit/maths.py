"""The audit's formulas: image quality, the inversion loss terms, label inference.

Pure functions over numpy arrays or torch tensors; nothing here knows a family,
a message or a run.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio of two images, in dB: ``10 log10(range^2 / MSE)``
    (``inf`` for identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(data_range**2 / mse))


def best_matches(
    reconstructions: np.ndarray, images: np.ndarray, *, data_range: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """For each reconstruction, the image it is closest to and that PSNR.

    The true batch need not be known: each reconstruction is scored by its best
    PSNR against every image the client holds.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Per reconstruction: the index of its best-matching image, and the PSNR (dB).
    """
    rec = np.asarray(reconstructions, np.float64).reshape(len(reconstructions), -1)
    img = np.asarray(images, np.float64).reshape(len(images), -1)
    mse = ((rec[:, None, :] - img[None, :, :]) ** 2).mean(axis=2)
    index = mse.argmin(axis=1)
    best = mse[np.arange(len(rec)), index]
    with np.errstate(divide="ignore"):
        return index, 10.0 * np.log10(data_range**2 / best)


def psnr_matrix(
    reconstructions: np.ndarray, images: np.ndarray, *, data_range: float = 1.0
) -> np.ndarray:
    """PSNR (dB) of every reconstruction (rows) against every image (columns);
    ``inf`` for exact copies."""
    rec = np.asarray(reconstructions, np.float64).reshape(len(reconstructions), -1)
    img = np.asarray(images, np.float64).reshape(len(images), -1)
    mse = ((rec[:, None, :] - img[None, :, :]) ** 2).mean(axis=2)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)  # type: ignore[no-any-return]


def one_to_one(
    reconstructions: np.ndarray,
    images: np.ndarray,
    *,
    cap: float = 100.0,
    data_range: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each reconstruction matched to a different image, the total PSNR as
    large as possible (the Hungarian assignment,
    :func:`scipy.optimize.linear_sum_assignment`, on PSNR capped at ``cap``):
    eight copies of one image recover one image, not eight.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, numpy.ndarray)
        The matched reconstructions' and images' indices and their PSNRs
        (``min(n_reconstructions, n_images)`` pairs).
    """
    from scipy.optimize import linear_sum_assignment

    scores = np.minimum(
        psnr_matrix(reconstructions, images, data_range=data_range), cap
    )
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return rows, cols, scores[rows, cols]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of images ``(n, c, h, w)``: the mean absolute
    difference of neighbouring pixels, vertically plus horizontally (Geiping et
    al.'s image prior); 0 for inputs that are not images."""
    if x.dim() != 4:
        return x.new_zeros(())
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    return dx + dy


def cosine_distance(
    simulated: Mapping[str, torch.Tensor], observed: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``1 - cos`` of two updates, every tensor flattened into one vector
    (Inverting Gradients' matching loss); keys of ``observed`` are compared."""
    dot = sum((simulated[k] * observed[k]).sum() for k in observed)
    norm_s = sum(simulated[k].pow(2).sum() for k in observed)
    norm_o = sum(observed[k].pow(2).sum() for k in observed)
    return 1.0 - dot / (torch.sqrt(norm_s) * torch.sqrt(norm_o) + 1e-12)  # type: ignore[operator, arg-type]


def relative_distance(simulated: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """``||simulated - observed||^2 / ||observed||^2``: the activation-matching
    loss, free of the activations' scale (so one TV weight fits every cut)."""
    diff = (simulated - observed).pow(2).sum()
    return diff / (observed.pow(2).sum() + 1e-12)


def infer_label_counts(bias_update: np.ndarray, n: int) -> np.ndarray:
    """How many of ``n`` examples carry each label, from the update of the output
    layer's bias.

    The mean cross-entropy gradient with respect to the output bias is ``p_c -
    n_c / n`` (``p_c``: the mean predicted probability of class ``c``), so a
    descent step moves the bias by ``k (n_c / n - p_c)`` for some ``k > 0``
    (iDLG, Zhao et al. 2020, reads the one label of a single example off its
    sign). Taking ``p_c = 1 / C`` (about uniform predictions, as early in
    training) and the class that fell most as absent (``n_c = 0``) gives ``k``,
    then every share ``n_c / n``; the counts are the shares times ``n``, rounded
    by largest remainders to sum to ``n``. Exact for one example; for several, a
    heuristic that holds while the predictions stay about uniform.
    """
    update = np.asarray(bias_update, np.float64)
    classes = len(update)
    low = float(update.min())
    if low >= 0:  # nothing fell: every example has the label that rose most
        counts = np.zeros(classes, np.int64)
        counts[int(np.argmax(update))] = n
        return counts
    k = -low * classes
    share = np.clip(update / k + 1.0 / classes, 0.0, None)
    share = share / share.sum() * n
    counts = np.floor(share).astype(np.int64)
    for c in np.argsort(-(share - counts), kind="stable")[: n - int(counts.sum())]:
        counts[c] += 1
    return counts


def labels_from_counts(counts: np.ndarray) -> np.ndarray:
    """Label of each example, counts expanded in class order."""
    return np.repeat(np.arange(len(counts)), counts).astype(np.int64)


def image_grid(rows: list[np.ndarray], *, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Images ``(n, c, h, w)`` in [0, 1] laid out one list per grid row, each
    pixel ``scale`` x ``scale``; a grey image ``(H, W)`` or RGB ``(H, W, 3)``."""
    c, h, w = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = np.ones((len(rows) * cell_h + pad, cols * cell_w + pad, c))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            big = np.kron(np.clip(image, 0, 1), np.ones((1, scale, scale)))
            y, x = pad + i * cell_h, pad + j * cell_w
            grid[y : y + h * scale, x : x + w * scale] = big.transpose(1, 2, 0)
    return grid[:, :, 0] if c == 1 else grid
