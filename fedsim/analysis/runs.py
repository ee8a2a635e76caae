"""Read run directories and compute the common views of their round metrics.

A run directory (see :mod:`fedsim.engine.recorder`) holds ``config.toml``,
``metrics.parquet`` (long format: ``round``, ``client``, ``phase``, ``metric``,
``value``) and ``summary.json``. :func:`load_run` reads one; :func:`load_runs`
stacks several into one long DataFrame whose extra columns label each row with
its run (``run``, ``label``) and the settings that tell runs apart (``strategy``,
``privacy``, ``ranks``, ``seed``...), so that comparing runs is a ``groupby``.

Runs that failed midway, or are still going, are read as they are: every round
the recorder closed is there (``metrics.parquet`` is rewritten atomically at the
end of each round), and ``status`` says how the run stands.

The views:

- :func:`round_metric`: an aggregated metric per round, one column per run.
- :func:`client_metric` / :func:`client_spread`: the per-client values of a
  metric per round, and their distribution (quartiles, min, max).
- :func:`communication`: bytes up and down per round, and their running total.
- :func:`epsilon_per_round`: the largest privacy loss of any client so far.
- :func:`comparison`: one row per run: final and best accuracy, rounds to reach
  a target accuracy, total bytes, wall time, final epsilon.
"""

from __future__ import annotations

import glob
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsim.core.errors import ConfigError
from fedsim.core.schema import flatten
from fedsim.engine.recorder import (
    CHECKPOINTS_DIR,
    COLUMNS,
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    read_metrics,
)

#: Accuracy a run must reach for ``rounds_to_target`` unless told otherwise.
DEFAULT_TARGET = 0.8

#: Label columns :func:`load_runs` adds, and the config key each comes from.
LABEL_KEYS: Mapping[str, str] = {
    "name": "name",
    "strategy": "strategy.name",
    "privacy": "privacy.mechanism",
    "peft": "peft.method",
    "seed": "seed",
    "dataset": "data.dataset",
    "partitioner": "data.partitioner",
    "alpha": "data.alpha",
    "model": "model.name",
    "clients": "federation.clients",
    "planned_rounds": "rounds",
}

#: Columns :func:`load_runs` puts before the metric columns.
RUN_COLUMNS = ("run", "label", *LABEL_KEYS, "ranks", "status", "wall_seconds", "path")

_DTYPES = {
    "round": "int64",
    "client": "Int64",
    "phase": "string",
    "metric": "string",
    "value": "float64",
}
_BYTES = ("bytes-up", "bytes-down")


class RunDirError(ConfigError):
    """A path that is not a readable run directory; the message is one line."""


@dataclass(frozen=True)
class Run:
    """One run directory as read at one moment.

    Attributes
    ----------
    path : Path
        The run directory.
    config : dict
        ``config.toml`` as a nested dict with kebab-case keys.
    metrics : pandas.DataFrame
        ``metrics.parquet`` (long format); empty before round 0 is recorded.
    summary : dict
        ``summary.json``; empty before the ServerApp has written it.
    """

    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame = field(repr=False)
    summary: dict[str, Any] = field(repr=False)

    @property
    def flat_config(self) -> dict[str, Any]:
        """The config with dotted keys (``data.alpha``)."""
        return flatten(self.config)

    @property
    def status(self) -> str:
        """``completed``, ``failed``, ``stopped``, ``interrupted``, ``running``, or
        ``starting`` while the ServerApp has not written ``summary.json`` yet."""
        return str(self.summary.get("status") or "starting")

    @property
    def rounds_done(self) -> int:
        """Rounds whose metrics are recorded (0: only the initial evaluation)."""
        if self.metrics.empty:
            return 0
        return int(self.metrics["round"].max())

    @property
    def ranks(self) -> str:
        """LoRA ranks as text (``"8"``, ``"4,8,16"``), empty without PEFT."""
        flat = self.flat_config
        if flat.get("peft.method", "none") == "none":
            return ""
        ranks = flat.get("peft.ranks") or []
        if ranks:
            return ",".join(str(r) for r in ranks)
        return str(flat.get("peft.rank", ""))

    @property
    def wall_seconds(self) -> float:
        """Server wall time so far: from the summary, else the last ``elapsed``."""
        seconds = self.summary.get("wall_seconds")
        if seconds is not None:
            return float(seconds)
        elapsed = self.metrics[
            (self.metrics["phase"] == "server") & (self.metrics["metric"] == "elapsed")
        ]["value"]
        return float(elapsed.max()) if len(elapsed) else float("nan")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def empty_metrics() -> pd.DataFrame:
    """A long-format metrics DataFrame with no rows and the recorder's dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _DTYPES.items()})


def _read_metrics(path: Path) -> pd.DataFrame:
    file = path / METRICS_FILE
    try:
        frame = read_metrics(path)
    except Exception as err:  # pyarrow raises several unrelated types
        raise RunDirError(f"{file}: unreadable metrics: {_one_line(err)}") from None
    if frame is None:
        return empty_metrics()
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise RunDirError(f"{file}: missing columns {', '.join(missing)}")
    try:
        return frame[list(COLUMNS)].astype(_DTYPES)
    except (TypeError, ValueError) as err:
        raise RunDirError(f"{file}: malformed metrics: {_one_line(err)}") from None


def load_run(path: str | Path) -> Run:
    """Read one run directory; a run still going or stopped midway is fine.

    Parameters
    ----------
    path : str or Path
        A run directory (``runs/<name>-<timestamp>``).

    Returns
    -------
    Run
        Its config, metrics and summary.

    Raises
    ------
    RunDirError
        The path is missing, is no run directory (no ``config.toml``), or one of
        its files cannot be read; the message is one line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path}: no such run directory")
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory")
    config_file = path / CONFIG_FILE
    if not _is_run_dir(path):
        raise RunDirError(
            f"{path}: not a run directory (needs {CONFIG_FILE} and "
            f"{SUMMARY_FILE}, {METRICS_FILE} or {CHECKPOINTS_DIR}/)"
        )
    try:
        config = tomllib.loads(config_file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RunDirError(f"{config_file}: invalid TOML: {_one_line(err)}") from None
    summary: dict[str, Any] = {}
    summary_file = path / SUMMARY_FILE
    if summary_file.exists():
        try:
            loaded = json.loads(summary_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise RunDirError(
                f"{summary_file}: invalid JSON: {_one_line(err)}"
            ) from None
        if not isinstance(loaded, dict):
            raise RunDirError(f"{summary_file}: expected a JSON object")
        summary = loaded
    return Run(path, config, _read_metrics(path), summary)


def _is_run_dir(path: Path) -> bool:
    """``config.toml`` and what the recorder adds (an experiment folder, or
    Flower's home, has a ``config.toml`` too)."""
    return (path / CONFIG_FILE).is_file() and (
        (path / SUMMARY_FILE).is_file()
        or (path / METRICS_FILE).is_file()
        or (path / CHECKPOINTS_DIR).is_dir()
    )


def run_paths(paths_or_glob: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand run directories, glob patterns, and folders of run directories.

    A folder that is not a run directory itself but holds run directories (such
    as ``runs/``) stands for all of them, in name order; a pattern passes over
    matches that are neither. A plain path that is neither is kept as it is, for
    :func:`load_run` to say what is wrong with it.

    Raises
    ------
    RunDirError
        A pattern matches no run directory, or nothing was given.
    """
    items = [paths_or_glob] if isinstance(paths_or_glob, (str, Path)) else paths_or_glob
    out: list[Path] = []
    for item in items:
        text = str(item)
        if glob.has_magic(text):
            # a pattern passes over what is no run (mlflow.db, a report folder)
            found = [
                run
                for match in sorted(Path(p) for p in glob.glob(text))
                for run in _runs_in(match)
            ]
            if not found:
                raise RunDirError(f"{text}: matches no run directory")
            out.extend(found)
        else:
            path = Path(text)
            out.extend(_runs_in(path) or [path])  # load_run says what is wrong
    if not out:
        raise RunDirError("no run directory given")
    return out


def _runs_in(path: Path) -> list[Path]:
    """``[path]`` for a run directory, the run directories a folder holds, or
    ``[]``."""
    if _is_run_dir(path):
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if _is_run_dir(p))
    return []


def _run_ids(runs: list[Run]) -> list[str]:
    names = [r.path.name for r in runs]
    ids = []
    for run, name in zip(runs, names, strict=True):
        if names.count(name) > 1:
            name = f"{run.path.parent.name}/{name}"
        ids.append(name)
    seen: dict[str, int] = {}
    unique = []
    for name in ids:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _label_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_labels(runs: list[Run], ids: list[str] | None = None) -> list[str]:
    """Short labels that tell runs apart.

    The experiment names when they differ between all runs; otherwise the
    settings that differ (``strategy.name`` shown by value alone, others as
    ``key=value``); the run ids where that is not enough.
    """
    ids = ids if ids is not None else _run_ids(runs)
    if len(runs) == 1:
        return [str(runs[0].config.get("name") or ids[0])]
    names = [str(r.config.get("name", "")) for r in runs]
    if all(names) and len(set(names)) == len(names):
        return names
    flats = [r.flat_config for r in runs]
    keys = sorted({k for f in flats for k in f} - {"name"})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    first = [k for k in ("strategy.name", "privacy.mechanism") if k in differ]
    differ = first + [k for k in differ if k not in first]
    labels = []
    for flat in flats:
        parts = []
        for key in differ:
            value = _label_value(flat.get(key, "-"))
            parts.append(value if key == "strategy.name" else f"{key}={value}")
        labels.append(", ".join(parts))
    if len(set(labels)) < len(labels) or not all(labels):
        return ids
    return labels


def runs_frame(runs: list[Run]) -> pd.DataFrame:
    """Stack runs' metrics into one long DataFrame with the run label columns.

    Parameters
    ----------
    runs : list of Run
        Runs as read by :func:`load_run`.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`RUN_COLUMNS` followed by the metrics columns; rows keep
        the order of ``runs``. A run without recorded rounds has no rows.
    """
    ids = _run_ids(runs)
    labels = run_labels(runs, ids)
    parts = []
    for run, run_id, label in zip(runs, ids, labels, strict=True):
        flat = run.flat_config
        frame = run.metrics.copy()
        info: dict[str, Any] = {
            "run": run_id,
            "label": label,
            **{col: flat.get(key) for col, key in LABEL_KEYS.items()},
            "ranks": run.ranks,
            "status": run.status,
            "wall_seconds": run.wall_seconds,
            "path": str(run.path),
        }
        for col in reversed(RUN_COLUMNS):
            frame.insert(0, col, [info[col]] * len(frame))
        parts.append(frame)
    if not parts:
        return _typed(pd.DataFrame(columns=[*RUN_COLUMNS, *COLUMNS]))
    return _typed(pd.concat(parts, ignore_index=True))


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    text = [
        "run",
        "label",
        "name",
        "strategy",
        "privacy",
        "peft",
        "dataset",
        "partitioner",
        "model",
        "ranks",
        "status",
        "path",
    ]
    types: dict[str, str] = {c: "string" for c in text}
    types.update(seed="Int64", clients="Int64", planned_rounds="Int64")
    types.update(alpha="float64", wall_seconds="float64", **_DTYPES)
    return frame.astype(types)


def load_runs(paths_or_glob: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Read several runs into one long DataFrame labelled from their configs.

    Parameters
    ----------
    paths_or_glob : str, Path or iterable of them
        Run directories, glob patterns (``"runs/*"``) or folders holding run
        directories.

    Returns
    -------
    pandas.DataFrame
        One row per metric value: :data:`RUN_COLUMNS` (``run``, ``label``,
        ``strategy``, ``privacy``, ``ranks``, ``seed``, ``status``...) then
        ``round``, ``client``, ``phase``, ``metric``, ``value``.
    """
    return runs_frame([load_run(p) for p in run_paths(paths_or_glob)])


# -- views ------------------------------------------------------------------------


def run_order(frame: pd.DataFrame, by: str = "label") -> list[Any]:
    """Run names in ``by`` in the order they first appear in ``frame``."""
    return list(dict.fromkeys(frame[by].tolist()))


def _aggregated(frame: pd.DataFrame, metric: str, phase: str) -> pd.DataFrame:
    return frame[
        (frame["phase"] == phase) & (frame["metric"] == metric) & frame["client"].isna()
    ]


def round_metric(
    frame: pd.DataFrame,
    metric: str = "accuracy",
    phase: str = "server",
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
        ``train`` (aggregates of the clients' replies).
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
    """Per-client values of a metric: columns ``by``, ``round``, ``client``,
    ``value`` (failed clients, which report no metric, are absent)."""
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


def _last(series: pd.Series) -> float:
    series = series.dropna()
    return float(series.iloc[-1]) if len(series) else float("nan")


def comparison(
    frame: pd.DataFrame,
    *,
    target: float = DEFAULT_TARGET,
    phase: str = "server",
    by: str = "label",
) -> pd.DataFrame:
    """One row per run: how well, how fast, at what cost.

    Parameters
    ----------
    frame : pandas.DataFrame
        From :func:`load_runs`.
    target : float
        Accuracy for ``rounds_to_target``.
    phase : str
        Whose accuracy and loss: ``server`` (global model, held-out test set) or
        ``evaluate`` (clients' local test splits, example-weighted).
    by : str
        Column naming the runs.

    Returns
    -------
    pandas.DataFrame
        Index ``by``; columns ``run``, ``strategy``, ``privacy``, ``status``,
        ``rounds`` (recorded), ``planned_rounds``, ``final_accuracy``,
        ``best_accuracy``, ``best_round``, ``rounds_to_target`` (first round
        whose accuracy is >= ``target``; <NA> if none), ``final_loss``,
        ``federated_accuracy`` (last aggregated client-side accuracy),
        ``bytes_up``, ``bytes_down`` (totals over all rounds and phases),
        ``wall_seconds``, ``epsilon`` (largest epsilon recorded; NaN if none).
    """
    accuracy = round_metric(frame, "accuracy", phase, by=by)
    loss = round_metric(frame, "loss", phase, by=by)
    federated = round_metric(frame, "accuracy", "evaluate", by=by)
    comm = (
        communication(frame, by=by)
        .groupby(by, sort=False)[["bytes_up", "bytes_down"]]
        .sum()
    )
    eps = frame[frame["metric"] == "epsilon"].groupby(by, sort=False)["value"].max()
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
                "final_accuracy": _last(acc),
                "best_accuracy": float(acc.max()) if len(acc) else np.nan,
                "best_round": int(acc.idxmax()) if len(acc) else pd.NA,
                "rounds_to_target": int(reached.index[0]) if len(reached) else pd.NA,
                "final_loss": _last(loss[name]) if name in loss else np.nan,
                "federated_accuracy": (
                    _last(federated[name]) if name in federated else np.nan
                ),
                "bytes_up": float(comm.loc[name, "bytes_up"]),
                "bytes_down": float(comm.loc[name, "bytes_down"]),
                "epsilon": float(eps[name]) if name in eps.index else np.nan,
            }
        )
    columns = [
        "run",
        "strategy",
        "privacy",
        "status",
        "rounds",
        "planned_rounds",
        "final_accuracy",
        "best_accuracy",
        "best_round",
        "rounds_to_target",
        "final_loss",
        "federated_accuracy",
        "bytes_up",
        "bytes_down",
        "wall_seconds",
        "epsilon",
    ]
    if not rows:
        return pd.DataFrame(columns=columns, index=pd.Index([], name=by))
    out = pd.DataFrame(rows).set_index(by).join(info)
    out = out.astype({"best_round": "Int64", "rounds_to_target": "Int64"})
    out.attrs["target"] = target
    out.attrs["phase"] = phase
    return out[columns]


# -- display ----------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 kB"`` (powers of 1000)."""
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


def comparison_table(table: pd.DataFrame, title: str = "fedsim report") -> Any:
    """The :func:`comparison` DataFrame as a ``rich.table.Table``."""
    from rich.table import Table

    target = table.attrs.get("target", DEFAULT_TARGET)
    phase = table.attrs.get("phase", "server")
    out = Table(title=title, caption=f"accuracy and loss: {phase} phase")
    out.add_column(str(table.index.name or "run"), overflow="fold")
    out.add_column("status")
    for name in (
        "rounds",
        "accuracy",
        "best (round)",
        f"rounds to {target:g}",
        "loss",
        "fed. acc",
        "bytes up",
        "bytes down",
        "wall",
        "epsilon",
    ):
        out.add_column(name, justify="right", no_wrap=True)
    for label, row in table.iterrows():
        style = _STATUS_STYLE.get(str(row["status"]), "")
        best = _num(row["best_accuracy"])
        if row["best_round"] is not pd.NA:
            best += f" ({row['best_round']})"
        out.add_row(
            str(label),
            f"[{style}]{row['status']}[/]" if style else str(row["status"]),
            f"{row['rounds']}/{_num(row['planned_rounds'], 'd')}",
            _num(row["final_accuracy"]),
            best,
            _num(row["rounds_to_target"], "d"),
            _num(row["final_loss"]),
            _num(row["federated_accuracy"]),
            human_bytes(row["bytes_up"]),
            human_bytes(row["bytes_down"]),
            f"{_num(row['wall_seconds'], '.1f')} s",
            _num(row["epsilon"], ".3f"),
        )
    return out
