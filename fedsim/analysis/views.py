"""Per-round views of the DataFrame of :func:`fedsim.analysis.load_runs`.

- :func:`round_metric`: an aggregated metric per round, one column per run.
- :func:`client_metric` / :func:`client_spread`: the per-client values of a
  metric per round, and their distribution (quartiles, min, max).
- :func:`communication`: bytes up and down per round, and their running total.
- :func:`epsilon_per_round`: the largest privacy loss of any client so far.

**Headline phase.** A run's accuracy and loss are those of the global model on the
held-out test set (``server`` phase), except for strategy families without a global
model, whose ``summary.json`` names ``evaluate`` as ``headline``: their accuracy
and loss are the clients' local evaluation (aggregated ``evaluate`` rows). The
phase :data:`HEADLINE` (the default of :func:`round_metric`) takes each run's own
headline phase, so that runs of both kinds can be compared together.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from fedsim.core.rundir import DEFAULT_HEADLINE

#: The ``phase`` that stands for each run's headline phase (its ``headline``
#: column: ``server``, or ``evaluate`` for families without a global model).
HEADLINE = "headline"

_BYTES = ("bytes-up", "bytes-down")


def run_order(frame: pd.DataFrame, by: str = "label") -> list[Any]:
    """Run names in ``by`` in the order they first appear in ``frame``.

    Parameters
    ----------
    frame : pandas.DataFrame
        From :func:`fedsim.analysis.load_runs`.
    by : str
        Column naming the runs (``label`` or ``run``).

    Returns
    -------
    list
        The distinct values of ``frame[by]``, first appearance first.
    """
    return list(dict.fromkeys(frame[by].tolist()))


def _headlines(frame: pd.DataFrame) -> pd.Series:
    """Each row's run's headline phase (``server`` for frames without the column)."""
    if HEADLINE not in frame.columns:
        return pd.Series(DEFAULT_HEADLINE, index=frame.index, dtype="string")
    return frame[HEADLINE].astype("string").fillna(DEFAULT_HEADLINE)


def headline_phases(frame: pd.DataFrame, *, by: str = "label") -> pd.Series:
    """The headline phase of each run: ``server``, or ``evaluate`` for runs of
    strategy families without a global model.

    Parameters
    ----------
    frame : pandas.DataFrame
        From :func:`fedsim.analysis.load_runs`.
    by : str
        Column naming the runs.

    Returns
    -------
    pandas.Series
        Index ``by`` in :func:`run_order`; values ``server`` or ``evaluate``.
    """
    phases = _headlines(frame).groupby(frame[by], sort=False).first()
    return phases.reindex(run_order(frame, by)).rename(HEADLINE).rename_axis(by)


def phase_name(frame: pd.DataFrame, phase: str = HEADLINE) -> str:
    """The phase a view of ``frame`` shows, as a name for labels and messages.

    Parameters
    ----------
    frame : pandas.DataFrame
        From :func:`fedsim.analysis.load_runs`.
    phase : str
        A phase, or :data:`HEADLINE`.

    Returns
    -------
    str
        ``phase`` itself; for :data:`HEADLINE`, the runs' headline phase where
        they all share one (``server`` for a frame without runs), else
        ``headline``.
    """
    if phase != HEADLINE:
        return phase
    phases = set(_headlines(frame).tolist()) or {DEFAULT_HEADLINE}
    return str(phases.pop()) if len(phases) == 1 else HEADLINE


def _aggregated(frame: pd.DataFrame, metric: str, phase: str) -> pd.DataFrame:
    wanted = _headlines(frame) if phase == HEADLINE else phase
    return frame[
        (frame["phase"] == wanted)
        & (frame["metric"] == metric)
        & frame["client"].isna()
    ]


def round_metric(
    frame: pd.DataFrame,
    metric: str = "accuracy",
    phase: str = HEADLINE,
    *,
    by: str = "label",
) -> pd.DataFrame:
    """The aggregated value of a metric per round, one column per run.

    Parameters
    ----------
    frame : pandas.DataFrame
        From :func:`load_runs`.
    metric : str
        Metric name (``accuracy``, ``loss``, ``bytes-up``...).
    phase : str
        ``server`` (global model on the held-out test set), ``evaluate`` or
        ``train`` (aggregates of the clients' replies), or :data:`HEADLINE`
        (default): each run's headline phase, ``server`` unless the run's
        ``summary.json`` names ``evaluate`` (families without a global model).
    by : str
        Column naming the runs (``label`` or ``run``).

    Returns
    -------
    pandas.DataFrame
        Index ``round``; NaN where a run has no value for a round.
    """
    rows = _aggregated(frame, metric, phase)
    wide = rows.pivot_table(index="round", columns=by, values="value", aggfunc="last")
    wide = wide.reindex(columns=[c for c in run_order(frame, by) if c in wide.columns])
    wide.columns.name = by
    return wide


def client_metric(
    frame: pd.DataFrame,
    metric: str = "accuracy",
    phase: str = "evaluate",
    *,
    by: str = "label",
) -> pd.DataFrame:
    """Per-client values of a metric.

    Parameters
    ----------
    frame : pandas.DataFrame
        From :func:`fedsim.analysis.load_runs`.
    metric : str
        Metric name.
    phase : str
        ``evaluate`` (clients' local test splits) or ``train``.
    by : str
        Column naming the runs.

    Returns
    -------
    pandas.DataFrame
        Columns ``by``, ``round``, ``client``, ``value``; failed clients, which
        report no metric, are absent.
    """
    rows = frame[
        (frame["phase"] == phase)
        & (frame["metric"] == metric)
        & frame["client"].notna()
    ]
    return rows[[by, "round", "client", "value"]].reset_index(drop=True)


def client_spread(
    frame: pd.DataFrame,
    metric: str = "accuracy",
    phase: str = "evaluate",
    *,
    by: str = "label",
) -> pd.DataFrame:
    """Distribution of a per-client metric per run and round.

    Returns
    -------
    pandas.DataFrame
        Index (``by``, ``round``); columns ``clients``, ``mean``, ``std``,
        ``min``, ``q25``, ``median``, ``q75``, ``max``.
    """
    rows = client_metric(frame, metric, phase, by=by)
    grouped = rows.groupby([by, "round"], sort=False)["value"]
    out = pd.DataFrame(
        {
            "clients": grouped.count(),
            "mean": grouped.mean(),
            "std": grouped.std(ddof=0),
            "min": grouped.min(),
            "q25": grouped.quantile(0.25),
            "median": grouped.median(),
            "q75": grouped.quantile(0.75),
            "max": grouped.max(),
        }
    )
    order = {name: i for i, name in enumerate(run_order(frame, by))}
    return out.reindex(sorted(out.index, key=lambda k: (order[k[0]], k[1])))


def communication(frame: pd.DataFrame, *, by: str = "label") -> pd.DataFrame:
    """Bytes sent per run and round, all phases together.

    Returns
    -------
    pandas.DataFrame
        Columns ``by``, ``round``, ``bytes_up``, ``bytes_down``, ``bytes``
        (up + down) and ``cumulative_bytes``; one row per recorded round,
        round 0 (the initial evaluation) having sent nothing.
    """
    rows = frame[frame["client"].isna() & frame["metric"].isin(_BYTES)]
    per_round = rows.pivot_table(
        index=[by, "round"], columns="metric", values="value", aggfunc="sum"
    )
    per_round = per_round.reindex(columns=list(_BYTES))
    rounds = frame[[by, "round"]].drop_duplicates()
    out = rounds.merge(per_round.reset_index(), on=[by, "round"], how="left").fillna(
        {m: 0.0 for m in _BYTES}
    )
    out = out.rename(columns={"bytes-up": "bytes_up", "bytes-down": "bytes_down"})
    order = {name: i for i, name in enumerate(run_order(frame, by))}
    out = out.sort_values(
        [by, "round"], key=lambda s: s.map(order) if s.name == by else s
    ).reset_index(drop=True)
    out["bytes"] = out["bytes_up"] + out["bytes_down"]
    out["cumulative_bytes"] = out.groupby(by, sort=False)["bytes"].cumsum()
    return out[[by, "round", "bytes_up", "bytes_down", "bytes", "cumulative_bytes"]]


def epsilon_per_round(frame: pd.DataFrame, *, by: str = "label") -> pd.DataFrame:
    """The largest privacy loss epsilon of any client up to each round.

    Every ``epsilon`` row counts (a client's own, their aggregate, or one a
    strategy computed on the server); a client's epsilon never decreases, so
    the running maximum is the budget spent by the worst-off client.

    Returns
    -------
    pandas.DataFrame
        Index ``round``, one column per run that recorded epsilon.
    """
    rows = frame[frame["metric"] == "epsilon"]
    wide = rows.pivot_table(index="round", columns=by, values="value", aggfunc="max")
    wide = wide.reindex(columns=[c for c in run_order(frame, by) if c in wide.columns])
    wide.columns.name = by
    return wide.cummax()
