"""The comparison of runs: one row per run (:func:`comparison`), and its rendering
as a rich table (:func:`comparison_table`, what ``fedsim report`` prints).

Each run's accuracy and loss come from its headline phase (see
:mod:`fedsim.analysis.views`): the global model's (``server``), or the clients'
local evaluation (``evaluate``) for strategy families without a global model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fedsim.analysis.views import (
    HEADLINE,
    communication,
    headline_phases,
    phase_name,
    round_metric,
    run_order,
)
from fedsim.core.rundir import ATTACK_PSNR

#: Accuracy a run must reach for ``rounds_to_target`` unless told otherwise.
DEFAULT_TARGET = 0.8


def _last(series: pd.Series) -> float:
    series = series.dropna()
    return float(series.iloc[-1]) if len(series) else float("nan")


def comparison(
    frame: pd.DataFrame,
    *,
    target: float = DEFAULT_TARGET,
    phase: str = HEADLINE,
    by: str = "label",
) -> pd.DataFrame:
    """One row per run: how well, how fast, at what cost.

    Parameters
    ----------
    frame : pandas.DataFrame
        From :func:`fedsim.analysis.load_runs`.
    target : float
        Accuracy for ``rounds_to_target``.
    phase : str
        Whose accuracy and loss: ``server`` (global model, held-out test set),
        ``evaluate`` (clients' local test splits, example-weighted), or
        :data:`~fedsim.analysis.views.HEADLINE` (default): each run's headline
        phase, ``server`` unless its ``summary.json`` names ``evaluate``
        (strategy families without a global model).
    by : str
        Column naming the runs.

    Returns
    -------
    pandas.DataFrame
        Index ``by``; columns ``run``, ``strategy``, ``privacy``, ``status``,
        ``phase`` (whose accuracy and loss the row shows: the run's headline
        phase, or ``phase`` if given), ``rounds`` (recorded), ``planned_rounds``,
        ``final_accuracy``, ``best_accuracy``, ``best_round``,
        ``rounds_to_target`` (first round whose accuracy is >= ``target``; <NA>
        if none), ``final_loss``,
        ``federated_accuracy`` (last aggregated client-side accuracy),
        ``bytes_up``, ``bytes_down`` (totals over all rounds and phases),
        ``wall_seconds``, ``epsilon`` (largest epsilon recorded; NaN if none),
        ``attack_psnr`` (the privacy audit's mean ``attack-psnr`` over every
        attacked client and round, dB; NaN if the run was not audited).
        ``attrs`` hold ``target`` and ``phase`` (the phase of every row, or
        ``headline`` where runs' headline phases differ).
    """
    accuracy = round_metric(frame, "accuracy", phase, by=by)
    loss = round_metric(frame, "loss", phase, by=by)
    robust = round_metric(frame, "robust-accuracy", phase, by=by)
    federated = round_metric(frame, "accuracy", "evaluate", by=by)
    comm = (
        communication(frame, by=by)
        .groupby(by, sort=False)[["bytes_up", "bytes_down"]]
        .sum()
    )
    eps = frame[frame["metric"] == "epsilon"].groupby(by, sort=False)["value"].max()
    attacked = frame[(frame["metric"] == ATTACK_PSNR) & frame["client"].notna()]
    psnr = attacked.groupby(by, sort=False)["value"].mean()
    phases = headline_phases(frame, by=by) if phase == HEADLINE else None
    info = frame.groupby(by, sort=False).agg(
        run=("run", "first"),
        strategy=("strategy", "first"),
        privacy=("privacy", "first"),
        status=("status", "first"),
        rounds=("round", "max"),
        planned_rounds=("planned_rounds", "first"),
        wall_seconds=("wall_seconds", "first"),
    )
    rows = []
    for name in run_order(frame, by):
        acc = accuracy[name].dropna() if name in accuracy else pd.Series(dtype=float)
        reached = acc[acc >= target]
        rows.append(
            {
                by: name,
                "phase": phase if phases is None else phases[name],
                "final_accuracy": _last(acc),
                "best_accuracy": float(acc.max()) if len(acc) else np.nan,
                "best_round": int(acc.idxmax()) if len(acc) else pd.NA,
                "rounds_to_target": int(reached.index[0]) if len(reached) else pd.NA,
                "final_loss": _last(loss[name]) if name in loss else np.nan,
                "robust_accuracy": (_last(robust[name]) if name in robust else np.nan),
                "federated_accuracy": (
                    _last(federated[name]) if name in federated else np.nan
                ),
                "bytes_up": float(comm.loc[name, "bytes_up"]),
                "bytes_down": float(comm.loc[name, "bytes_down"]),
                "epsilon": float(eps[name]) if name in eps.index else np.nan,
                "attack_psnr": float(psnr[name]) if name in psnr.index else np.nan,
            }
        )
    columns = [
        "run",
        "strategy",
        "privacy",
        "status",
        "phase",
        "rounds",
        "planned_rounds",
        "final_accuracy",
        "best_accuracy",
        "best_round",
        "rounds_to_target",
        "final_loss",
        "robust_accuracy",
        "federated_accuracy",
        "bytes_up",
        "bytes_down",
        "wall_seconds",
        "epsilon",
        "attack_psnr",
    ]
    if not rows:
        return pd.DataFrame(columns=columns, index=pd.Index([], name=by))
    out = pd.DataFrame(rows).set_index(by).join(info)
    out = out.astype({"best_round": "Int64", "rounds_to_target": "Int64"})
    out.attrs["target"] = target
    out.attrs["phase"] = phase_name(frame, phase)
    return out[columns]


def human_bytes(n: float) -> str:
    """A byte count as text: ``1536`` -> ``"1.5 kB"`` (powers of 1000).

    Parameters
    ----------
    n : float
        Bytes; NaN gives ``"-"``.

    Returns
    -------
    str
        ``B`` to ``GB``, one decimal from ``kB`` on.
    """
    if n != n:  # NaN
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _num(value: Any, fmt: str = ".4f") -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "-"
    return format(value, fmt)


_STATUS_STYLE = {
    "completed": "green",
    "stopped": "cyan",
    "running": "yellow",
    "starting": "yellow",
    "failed": "red",
    "interrupted": "red",
}


def _caption(table: pd.DataFrame) -> str:
    """Whose accuracy and loss the table shows; per phase where runs differ."""
    phase = table.attrs.get("phase", "server")
    if phase != HEADLINE or "phase" not in table.columns:
        return f"accuracy and loss: {phase} phase"
    runs: dict[str, list[str]] = {}
    for label, row_phase in table["phase"].items():
        runs.setdefault(str(row_phase), []).append(str(label))
    parts = [f"{p} phase for {', '.join(names)}" for p, names in runs.items()]
    return "accuracy and loss: " + "; ".join(parts)


def comparison_table(table: pd.DataFrame, title: str = "fedsim report") -> Any:
    """The :func:`comparison` DataFrame as a rich table.

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`comparison`.
    title : str
        The table's title.

    Returns
    -------
    rich.table.Table
        One row per run; the caption says whose accuracy and loss are shown
        (the phase, or each phase's runs where runs' headline phases differ).
        An ``attack PSNR`` column (dB) is added when a run was audited.
    """
    from rich.table import Table

    target = table.attrs.get("target", DEFAULT_TARGET)
    robust = "robust_accuracy" in table and bool(table["robust_accuracy"].notna().any())
    out = Table(title=title, caption=_caption(table))
    out.add_column(str(table.index.name or "run"), overflow="fold")
    out.add_column("status")
    for name in (
        "rounds",
        "accuracy",
        "best (round)",
        f"rounds to {target:g}",
        "loss",
        *(["robust acc"] if robust else []),
        "fed. acc",
        "bytes up",
        "bytes down",
        "wall",
        "epsilon",
    ):
        out.add_column(name, justify="right", no_wrap=True)
    audited = "attack_psnr" in table.columns and table["attack_psnr"].notna().any()
    if audited:
        out.add_column("attack PSNR", justify="right", no_wrap=True)
    for label, row in table.iterrows():
        style = _STATUS_STYLE.get(str(row["status"]), "")
        best = _num(row["best_accuracy"])
        if row["best_round"] is not pd.NA:
            best += f" ({row['best_round']})"
        cells = [
            str(label),
            f"[{style}]{row['status']}[/]" if style else str(row["status"]),
            f"{row['rounds']}/{_num(row['planned_rounds'], 'd')}",
            _num(row["final_accuracy"]),
            best,
            _num(row["rounds_to_target"], "d"),
            _num(row["final_loss"]),
            *([_num(row["robust_accuracy"])] if robust else []),
            _num(row["federated_accuracy"]),
            human_bytes(row["bytes_up"]),
            human_bytes(row["bytes_down"]),
            f"{_num(row['wall_seconds'], '.1f')} s",
            _num(row["epsilon"], ".3f"),
        ]
        if audited:
            cells.append(_num(row["attack_psnr"], ".2f") + " dB")
        out.add_row(*cells)
    return out
