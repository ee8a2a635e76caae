"""Plots of round metrics (matplotlib), from the DataFrame of
:func:`fedsim.analysis.load_runs`. Import as ``from fedsim.analysis import plots``.

Figures are built with :class:`matplotlib.figure.Figure` rather than pyplot: no
global state, no GUI backend (saving renders with Agg), and a notebook shows the
returned figure as it is. Each run keeps one colour in every figure.

Views (file names under ``fedsim report --out``):

- ``accuracy_loss``: accuracy and loss vs round, one line per run.
- ``accuracy_bytes``: accuracy vs cumulative bytes sent (up + down).
- ``epsilon``: privacy loss epsilon vs round (runs that recorded it).
- ``client_spread``: per-client accuracy per round, one box per round.

The accuracy and loss of the first two are each run's headline ones (see
:mod:`fedsim.analysis.views`): the global model's, or the clients' local
evaluation for strategy families without a global model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedsim.analysis.views import (
    HEADLINE,
    client_metric,
    communication,
    epsilon_per_round,
    phase_name,
    round_metric,
    run_order,
)

#: Every view, in the order ``fedsim report`` writes them.
VIEWS = ("accuracy_loss", "accuracy_bytes", "epsilon", "client_spread")

#: Most boxes drawn per run in ``client_spread`` (rounds are thinned beyond).
MAX_BOXES = 25


class NoData(ValueError):
    """The runs recorded nothing a view could show."""


def _colors(names: Sequence[Any]) -> dict[Any, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _legend(ax: Axes, n: int) -> None:
    if n:
        ax.legend(fontsize="small", loc="best", frameon=False)


def _round_axis(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(True, alpha=0.3)


def _lines(ax: Any, wide: pd.DataFrame, colors: dict[Any, Any]) -> None:
    """One line per run (column of ``wide``, indexed by round)."""
    for run in wide.columns:
        series = wide[run].dropna()
        ax.plot(
            series.index,
            series.values,
            marker="o",
            markersize=3,
            color=colors[run],
            label=str(run),
        )


def accuracy_loss(
    frame: pd.DataFrame, *, phase: str = HEADLINE, by: str = "label"
) -> Figure:
    """Accuracy (left) and loss (right) vs round, one line per run.

    ``phase`` ``server`` is the global model on the held-out test set;
    ``evaluate`` the clients' example-weighted local accuracy; ``headline``
    (:data:`~fedsim.analysis.views.HEADLINE`, the default) each run's headline
    phase, ``server`` but for families without a global model.
    """
    acc = round_metric(frame, "accuracy", phase, by=by)
    loss = round_metric(frame, "loss", phase, by=by)
    shown = phase_name(frame, phase)
    if acc.empty and loss.empty:
        raise NoData(f"no {shown} accuracy or loss recorded")
    colors = _colors(run_order(frame, by))
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, wide, name in ((ax_acc, acc, "accuracy"), (ax_loss, loss, "loss")):
        _lines(ax, wide, colors)
        ax.set_ylabel(f"{name} ({shown})")
        ax.set_title(f"{name} vs round")
        _round_axis(ax)
    ax_acc.set_ylim(0, 1.02)
    _legend(ax_acc, len(acc.columns))
    return fig


def accuracy_bytes(
    frame: pd.DataFrame, *, phase: str = HEADLINE, by: str = "label"
) -> Figure:
    """Accuracy vs cumulative bytes sent (up + down, all phases), per run.

    ``phase`` as in :func:`accuracy_loss`.
    """
    acc = round_metric(frame, "accuracy", phase, by=by)
    shown = phase_name(frame, phase)
    if acc.empty:
        raise NoData(f"no {shown} accuracy recorded")
    comm = communication(frame, by=by)
    colors = _colors(run_order(frame, by))
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for run in acc.columns:
        sent = comm[comm[by] == run].set_index("round")["cumulative_bytes"]
        series = acc[run].dropna()
        x = sent.reindex(series.index).to_numpy(dtype=float) / 1e6
        ax.plot(
            x,
            series.values,
            marker="o",
            markersize=3,
            color=colors[run],
            label=str(run),
        )
    ax.set_xlabel("cumulative bytes sent, up + down (MB)")
    ax.set_ylabel(f"accuracy ({shown})")
    ax.set_ylim(0, 1.02)
    ax.set_title("accuracy vs communication")
    ax.grid(True, alpha=0.3)
    _legend(ax, len(acc.columns))
    return fig


def epsilon(frame: pd.DataFrame, *, by: str = "label") -> Figure:
    """Largest epsilon of any client so far vs round, per run that recorded it."""
    eps = epsilon_per_round(frame, by=by)
    if eps.empty:
        raise NoData("no run recorded epsilon")
    colors = _colors(run_order(frame, by))
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    _lines(ax, eps, colors)
    ax.set_ylabel("epsilon (largest of any client)")
    ax.set_ylim(bottom=0)
    ax.set_title("privacy loss vs round")
    _round_axis(ax)
    _legend(ax, len(eps.columns))
    return fig


def _thin(rounds: list[int], most: int) -> list[int]:
    if len(rounds) <= most:
        return rounds
    keep = np.unique(np.linspace(0, len(rounds) - 1, most).round().astype(int))
    return [rounds[i] for i in keep]


def client_spread(
    frame: pd.DataFrame,
    *,
    metric: str = "accuracy",
    phase: str = "evaluate",
    by: str = "label",
) -> Figure:
    """Per-client ``metric`` per round as box plots, one panel per run.

    Boxes span the quartiles, whiskers 1.5 IQR, points beyond are outliers; the
    line joins the example-weighted aggregate. Long runs show at most
    :data:`MAX_BOXES` evenly spaced rounds.
    """
    per_client = client_metric(frame, metric, phase, by=by)
    if per_client.empty:
        raise NoData(f"no per-client {phase} {metric} recorded")
    aggregate = round_metric(frame, metric, phase, by=by)
    runs = [r for r in run_order(frame, by) if r in set(per_client[by])]
    colors = _colors(run_order(frame, by))
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig = Figure(figsize=(4.6 * cols + 0.6, 3.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
    for ax, run in zip(axes, runs, strict=False):  # spare panels stay empty
        mine = per_client[per_client[by] == run]
        rounds = _thin(sorted(int(r) for r in mine["round"].unique()), MAX_BOXES)
        values = [mine.loc[mine["round"] == r, "value"].to_numpy() for r in rounds]
        step = min(np.diff(rounds)) if len(rounds) > 1 else 1
        box = ax.boxplot(
            values,
            positions=rounds,
            widths=0.6 * step,
            patch_artist=True,
            manage_ticks=False,
            flierprops={"markersize": 3},
        )
        for patch in box["boxes"]:
            patch.set(facecolor=colors[run], alpha=0.45)
        for median in box["medians"]:
            median.set(color="black")
        if run in aggregate.columns:
            series = aggregate[run].dropna()
            ax.plot(
                series.index,
                series.values,
                color=colors[run],
                linewidth=1.5,
                label="aggregate",
            )
            ax.legend(fontsize="small", loc="lower right", frameon=False)
        ax.set_title(str(run), fontsize="medium")
        _round_axis(ax)
        ax.set_xlim(rounds[0] - step, rounds[-1] + step)
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(f"client {metric} ({phase})")
    fig.suptitle(f"per-client {metric} per round")
    return fig


_BUILDERS = {
    "accuracy_loss": accuracy_loss,
    "accuracy_bytes": accuracy_bytes,
    "epsilon": epsilon,
    "client_spread": client_spread,
}


def figure(view: str, frame: pd.DataFrame) -> Figure:
    """The figure of one view (a name from :data:`VIEWS`).

    Raises
    ------
    NoData
        The runs recorded nothing this view shows.
    """
    if view not in _BUILDERS:
        raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    return _BUILDERS[view](frame)


@dataclass
class Written:
    """What :func:`write_plots` did: files per view, and why views were skipped."""

    files: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def write_plots(
    frame: pd.DataFrame,
    out: str | Path,
    views: Sequence[str] = VIEWS,
    *,
    dpi: int = 120,
) -> Written:
    """Write one PNG per view to ``out``; views without data are skipped.

    Parameters
    ----------
    frame : pandas.DataFrame
        From :func:`fedsim.analysis.load_runs`.
    out : str or Path
        Folder of the PNGs, named ``<view>.png``.
    views : sequence of str
        Names from :data:`VIEWS`.
    dpi : int
        Resolution of the PNGs.
    """
    unknown = [v for v in views if v not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown view {unknown[0]!r}; choose from {', '.join(VIEWS)}")
    out = Path(out)
    written = Written()
    for view in views:
        try:
            fig = figure(view, frame)
        except NoData as err:
            written.skipped[view] = str(err)
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{view}.png"
        fig.savefig(path, dpi=dpi)
        written.files[view] = path
    return written
