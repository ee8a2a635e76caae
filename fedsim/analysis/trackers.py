"""Experiment trackers: round metrics also go to TensorBoard and MLflow.

Enabled from the experiment file (needs the extras ``fedsim[tensorboard]`` /
``fedsim[mlflow]``)::

    [logging]
    tensorboard = true   # event files in <run dir>/tensorboard
    mlflow = true        # MLflow run in sqlite:///<runs folder>/mlflow.db

Each tracker is a :class:`fedsim.core.rundir.RoundSink`: when a round closes it
receives the rows the recorder has just written to ``metrics.parquet`` and logs
the aggregated ones (``client`` null) as ``<phase>/<metric>`` at step = round,
e.g. ``server/accuracy``, ``evaluate/accuracy``, ``train/loss``,
``train/bytes-up``.

The run directory stays the record of a run. A tracker opens at the first round
(round 0, before any training), so a misconfigured one fails the run at once
with its error as reason; a tracker that fails later is dropped with a warning
and the run goes on.

MLflow's default store is a SQLite file next to the run directories (MLflow 3
keeps the plain-folder ``file:`` store in maintenance mode); browse it with
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``. Any tracking URI
MLflow accepts can be set with ``logging.mlflow-uri``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedsim.core.experiment import Experiment
from fedsim.core.loading import to_run_config, to_toml
from fedsim.core.rundir import RoundSink, Row

#: Folder of the TensorBoard event files inside a run directory.
TENSORBOARD_DIR = "tensorboard"
#: File of the default MLflow store, next to the run directories.
MLFLOW_DB = "mlflow.db"

_MLFLOW_STATUS = {
    "completed": "FINISHED",
    "stopped": "FINISHED",
    "interrupted": "KILLED",
}
_MLFLOW_BATCH = 1000  # MLflow's most metrics per log_batch call
_MLFLOW_PARAMS = 100  # and params


def tag(phase: str, metric: str) -> str:
    """Name of a round metric in the trackers: ``<phase>/<metric>``."""
    return f"{phase}/{metric}"


def aggregated(rows: Sequence[Row]) -> Iterator[tuple[int, str, float]]:
    """``(round, tag, value)`` of the aggregated rows (``client`` null)."""
    for rnd, client, phase, metric, value in rows:
        if client is None:
            yield rnd, tag(phase, metric), value


class TensorBoardSink:
    """Writes round metrics as TensorBoard scalars (``torch.utils.tensorboard``).

    Parameters
    ----------
    log_dir : Path
        Folder of the event files (``<run dir>/tensorboard``).
    experiment : Experiment
        Its resolved TOML is added as the text summary ``config``.
    """

    def __init__(self, log_dir: Path, experiment: Experiment):
        self.log_dir = log_dir
        self.experiment = experiment
        self._writer: Any = None

    def _open(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.log_dir))
        writer.add_text("config", "```\n" + to_toml(self.experiment) + "```")
        return writer

    def log_round(self, server_round: int, rows: Sequence[Row]) -> None:
        """Add each aggregated row as a scalar at step = its round; flush."""
        if self._writer is None:
            self._writer = self._open()
        for rnd, name, value in aggregated(rows):
            self._writer.add_scalar(name, value, global_step=rnd)
        self._writer.flush()

    def close(self, status: str) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MlflowSink:
    """Logs the config as params and round metrics as an MLflow run.

    Parameters
    ----------
    tracking_uri : str
        MLflow tracking URI (``sqlite:///...``, ``file:...``, ``http://...``).
    experiment_name : str
        MLflow experiment (created when missing).
    run_name : str
        MLflow run name (the run directory's name).
    experiment : Experiment
        Logged as params (dotted keys) and tags.
    run_dir : Path
        Recorded as the tag ``fedsim.run-dir``.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        experiment: Experiment,
        run_dir: Path,
    ):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.experiment = experiment
        self.run_dir = run_dir
        self.run_id: str | None = None
        self._client: Any = None

    def _experiment_id(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(client.create_experiment(self.experiment_name))
        except MlflowException:  # created meanwhile by a run beside this one
            found = client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return str(found.experiment_id)

    def _open(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        run = client.create_run(
            self._experiment_id(client),
            run_name=self.run_name,
            tags={
                "fedsim.run-dir": str(self.run_dir),
                "fedsim.strategy": self.experiment.strategy.name,
                "fedsim.privacy": self.experiment.privacy.mechanism,
            },
        )
        params = [Param(k, str(v)) for k, v in to_run_config(self.experiment).items()]
        for i in range(0, len(params), _MLFLOW_PARAMS):
            client.log_batch(run.info.run_id, params=params[i : i + _MLFLOW_PARAMS])
        self._client, self.run_id = client, run.info.run_id

    def log_round(self, server_round: int, rows: Sequence[Row]) -> None:
        """Log each aggregated row as a metric at step = its round."""
        from mlflow.entities import Metric

        if self._client is None:
            self._open()
        now = int(time.time() * 1000)
        metrics = [
            Metric(name, value, now, rnd) for rnd, name, value in aggregated(rows)
        ]
        for i in range(0, len(metrics), _MLFLOW_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + _MLFLOW_BATCH])

    def close(self, status: str) -> None:
        """End the MLflow run: FINISHED (completed, stopped), KILLED, or FAILED."""
        if self._client is not None:
            self._client.set_terminated(
                self.run_id, status=_MLFLOW_STATUS.get(status, "FAILED")
            )
            self._client = None


class Guarded:
    """Lets the first round's errors through; after that warns and drops the sink.

    A tracker that cannot start should stop the run before any training; one
    that breaks later (a full disk, a tracking server gone) must not end a run
    whose own record, the run directory, is intact.
    """

    def __init__(self, sink: RoundSink, name: str):
        self.sink = sink
        self.name = name
        self.started = False
        self.broken = False

    def log_round(self, server_round: int, rows: Sequence[Row]) -> None:
        """Forward to the sink (see the class docstring for errors)."""
        if self.broken:
            return
        if not self.started:
            self.sink.log_round(server_round, rows)
            self.started = True
            return
        try:
            self.sink.log_round(server_round, rows)
        except Exception as err:
            self._drop(err)

    def close(self, status: str) -> None:
        """Close the sink; an error becomes a warning."""
        if self.broken:
            return
        try:
            self.sink.close(status)
        except Exception as err:
            self._drop(err)

    def _drop(self, err: Exception) -> None:
        self.broken = True
        warnings.warn(
            f"{self.name} logging stopped: {type(err).__name__}: {err}",
            RuntimeWarning,
            stacklevel=3,
        )


def default_mlflow_uri(run_dir: Path) -> str:
    """``sqlite:///<folder of the run directory>/mlflow.db``."""
    return f"sqlite:///{run_dir.resolve().parent / MLFLOW_DB}"


def build_sinks(experiment: Experiment, run_dir: Path) -> list[RoundSink]:
    """The trackers ``[logging]`` enables, for the run in ``run_dir``."""
    cfg = experiment.logging
    sinks: list[RoundSink] = []
    if cfg.tensorboard:
        sink = TensorBoardSink(run_dir / TENSORBOARD_DIR, experiment)
        sinks.append(Guarded(sink, "TensorBoard"))
    if cfg.mlflow:
        mlflow = MlflowSink(
            cfg.mlflow_uri or default_mlflow_uri(run_dir),
            cfg.mlflow_experiment or experiment.name,
            run_dir.name,
            experiment,
            run_dir,
        )
        sinks.append(Guarded(mlflow, "MLflow"))
    return sinks
