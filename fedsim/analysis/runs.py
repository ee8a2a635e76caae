"""Read run directories into one long DataFrame labelled by run.

A run directory (see :mod:`fedsim.core.rundir`) holds ``config.toml``,
``metrics.parquet`` (long format: ``round``, ``client``, ``phase``, ``metric``,
``value``) and ``summary.json``. :func:`load_run` reads one; :func:`load_runs`
stacks several into one long DataFrame whose extra columns label each row with
its run (``run``, ``label``) and the settings that tell runs apart (``strategy``,
``privacy``, ``ranks``, ``seed``...), so that comparing runs is a ``groupby``.

Runs that failed midway, or are still going, are read as they are: every round
the recorder closed is there (``metrics.parquet`` is rewritten atomically at the
end of each round), and ``status`` says how the run stands.

The views of these frames are in :mod:`fedsim.analysis.views`, the comparison
table in :mod:`fedsim.analysis.tables`.
"""

from __future__ import annotations

import glob
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.core.errors import ConfigError
from fedsim.core.rundir import (
    CHECKPOINTS_DIR,
    COLUMNS,
    CONFIG_FILE,
    DTYPES,
    METRICS_FILE,
    SUMMARY_FILE,
    headline_phase,
    read_metrics,
)
from fedsim.core.schema import flatten

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
RUN_COLUMNS = (
    "run",
    "label",
    *LABEL_KEYS,
    "ranks",
    "status",
    "headline",
    "wall_seconds",
    "path",
)


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
    def headline(self) -> str:
        """Phase of the headline accuracy and loss: ``server`` (global model), or
        ``evaluate`` (clients' local evaluation) for families without a global
        model; ``summary.json``'s ``headline``, ``server`` where it has none."""
        return headline_phase(self.summary)

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
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in DTYPES.items()})


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
        return frame[list(COLUMNS)].astype(dict(DTYPES))
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
        try:
            headline_phase(loaded)
        except ValueError as err:
            raise RunDirError(f"{summary_file}: {err}") from None
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

    Parameters
    ----------
    paths_or_glob : str, Path or iterable of them
        Run directories, glob patterns (``"runs/*"``) or folders holding run
        directories.

    Returns
    -------
    list of Path
        The run directories, in the order given (a folder's in name order).

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

    Parameters
    ----------
    runs : list of Run
        Runs as read by :func:`load_run`.
    ids : list of str, optional
        The runs' ids (directory names made unique); worked out if not given.

    Returns
    -------
    list of str
        One label per run, in the order of ``runs``.
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
            "headline": run.headline,
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
    # every label column is text, but for the numbers set below
    types: dict[str, str] = {c: "string" for c in RUN_COLUMNS}
    types.update(seed="Int64", clients="Int64", planned_rounds="Int64")
    types.update(alpha="float64", wall_seconds="float64", **DTYPES)
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
        ``strategy``, ``privacy``, ``ranks``, ``seed``, ``status``,
        ``headline``...) then ``round``, ``client``, ``phase``, ``metric``,
        ``value``.
    """
    return runs_frame([load_run(p) for p in run_paths(paths_or_glob)])
