"""The run directory: resolved config, round metrics and the run summary.

``metrics.parquet`` is long format (``round``, ``client``, ``phase``, ``metric``,
``value``; ``client`` is the partition id, null on aggregated and server rows). It
is rewritten atomically each time a round completes, so a crash in round k leaves
rounds before k readable. ``summary.json`` is written when the run starts
(``status = "running"``) and again when it ends.

Phases: ``train`` and ``evaluate`` (per-client rows and their aggregate), ``server``
(server-side evaluation of the global model on the held-out test set, round 0 being
the initial model), ``audit`` (the privacy audit's seconds; its ``attack-psnr``
goes in the ``train`` rows).
"""

from __future__ import annotations

import os
import platform
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsim.core import registry
from fedsim.core.errors import ConfigError, RoundFailed, RunStopped
from fedsim.core.experiment import Experiment
from fedsim.core.loading import to_toml
from fedsim.core.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    GLOBAL_CHECKPOINT,
    METRICS_FILE,
    SUMMARY_FILE,
    MetricsWriter,
    RoundSink,
    aggregate_replies,
    read_metrics,
    write_json,
)
from fedsim.core.rundir import atomic_write as _atomic_write
from fedsim.engine.server.finite import check_loss
from fedsim.engine.server.placement import Placement

#: Per-client metrics summed over the exchanges of a round (one row per metric
#: per (round, client, phase), whatever the number of exchanges).
ADDITIVE = frozenset({"bytes-up", "bytes-down", "seconds"})

_VERSIONED = ("fedsim", "flwr", "torch", "ray", "numpy", "pandas", "opacus", "peft")


def versions() -> dict[str, str]:
    """Versions of Python and the packages that shape a run's numbers."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _savez(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object keeps numpy from adding ".npz"
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def headline_of(exp: Experiment) -> str:
    """The phase whose accuracy is the run's headline: ``server`` for families
    with a global model, else the clients' ``evaluate``."""
    return "server" if registry.family(exp.strategy.name).global_model else "evaluate"


def summary_base(
    exp: Experiment, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``summary.json`` of a run of ``exp`` that has not completed a round yet.

    ``extra`` entries are added as given (e.g. the privacy mechanism's
    ``accounting``).
    """
    return {
        "name": exp.name,
        "status": "running",
        "reason": None,
        "seed": exp.seed,
        "strategy": exp.strategy.name,
        "headline": headline_of(exp),
        "rounds": exp.rounds,
        "rounds_completed": 0,
        "started_at": datetime.now(UTC).isoformat(),
        "finished_at": None,
        "wall_seconds": None,
        "final": {},
        "failures": 0,
        "versions": versions(),
        **(extra or {}),
    }


def check_out(out: str | Path, flag: str = "--out") -> Path:
    """``out`` made absolute, if run directories can be created in it.

    Writes nothing. Raises :class:`ConfigError` naming ``flag`` when ``out`` is
    a file, lies under a file, or its nearest existing folder is not writable.
    """
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}: {path} is a file, not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag}: {path} lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: {existing} is not writable")
    return path


def create_run_dir(out: Path, exp: Experiment, flag: str = "--out") -> Path:
    """Create ``out/<name>-<timestamp>`` (made unique) holding ``config.toml``.

    A folder that cannot be created (read-only file system, no permission:
    what :func:`check_out` cannot see, e.g. as root) is a :class:`ConfigError`
    naming ``flag``.
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag}: cannot create {out}: {err.strerror}") from None
    base = out / f"{exp.name}-{stamp}"
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
        except OSError as err:
            raise ConfigError(
                f"{flag}: cannot create {run_dir}: {err.strerror}"
            ) from None
    (run_dir / CHECKPOINTS_DIR).mkdir()
    (run_dir / CONFIG_FILE).write_text(to_toml(exp), encoding="utf-8")
    return run_dir


class RunRecorder:
    """Collects round metrics and keeps the run directory up to date.

    ``sinks`` get the rows of each round once ``metrics.parquet`` holds them,
    and are closed when the run finishes. ``extra_summary`` entries are added to
    ``summary.json`` as given (e.g. the privacy mechanism's ``accounting``).
    """

    def __init__(
        self,
        run_dir: Path,
        experiment: Experiment,
        sinks: Sequence[RoundSink] = (),
        *,
        headline: str = "server",
        extra_summary: Mapping[str, Any] | None = None,
    ):
        self.run_dir = run_dir
        self.experiment = experiment
        self.sinks = list(sinks)
        self._sent = 0  # rows already given to the sinks
        self.rows: list[tuple[int, int | None, str, str, float]] = []
        self._writer = MetricsWriter()
        self._finals: dict[str, float] = {}
        self._scanned = 0  # rows already read by ``_final``
        self.headline = headline
        self._pending: dict[tuple[int, str], dict[int, dict[str, float]]] = defaultdict(
            dict
        )
        self._phase_seconds: dict[tuple[int, str], float] = {}
        self._strategy: dict[tuple[int, str], dict[str, float]] = {}
        self._server: list[tuple[int, int | None, str, str, float]] = []
        self.failures: list[dict[str, Any]] = []
        self.placement = Placement()
        self.rounds_completed = 0
        self.started = time.time()
        self.summary = summary_base(experiment, extra_summary)
        self.summary["headline"] = headline
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CHECKPOINTS_DIR).mkdir(exist_ok=True)
        if not (run_dir / CONFIG_FILE).exists():
            (run_dir / CONFIG_FILE).write_text(to_toml(experiment), encoding="utf-8")
        self._write_summary()

    # -- per-client and server rows ---------------------------------------------
    def client(
        self, server_round: int, phase: str, client: int, metrics: Mapping[str, float]
    ) -> None:
        """Record one client's reply metrics for a phase of a round.

        A client that answers several exchanges in a phase of a round keeps one
        row per metric: :data:`ADDITIVE` metrics are summed, others take the
        latest value. A non-finite ``loss`` fails the round unless
        ``train.allow-nonfinite`` (:func:`fedsim.engine.server.finite.check_loss`).
        """
        check_loss(self.experiment, server_round, phase, client, metrics)
        self._merge(server_round, phase, client, metrics)

    def _merge(
        self, server_round: int, phase: str, client: int, metrics: Mapping[str, float]
    ) -> None:
        held = self._pending[(server_round, phase)].setdefault(client, {})
        for name, value in metrics.items():
            value = float(value)
            held[name] = held.get(name, 0.0) + value if name in ADDITIVE else value

    def failure(
        self,
        server_round: int,
        phase: str,
        client: int,
        reason: str,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Record that a client failed a phase of a round (``metrics``: e.g. bytes
        that were sent to it all the same)."""
        self._merge(server_round, phase, client, {**(metrics or {}), "failed": 1.0})
        self.failures.append(
            {"round": server_round, "client": client, "phase": phase, "reason": reason}
        )

    def placed(self, server_round: int, phase: str, node: Any) -> None:
        """A client of a phase ran on Ray node ``node`` (id, address; None: not
        known): ``summary.json``'s ``placement``
        (:mod:`fedsim.engine.server.placement`)."""
        if node is not None:
            self.placement.served(server_round, phase, node)

    def strategy(
        self, server_round: int, phase: str, metrics: Mapping[str, float]
    ) -> None:
        """Record metrics a strategy computed itself (aggregated rows)."""
        self._strategy[(server_round, phase)] = dict(metrics)

    def phase_seconds(self, server_round: int, phase: str, seconds: float) -> None:
        """Wall-clock seconds the server waited for a phase's replies (summed
        over the phase's exchanges in the round)."""
        key = (server_round, phase)
        self._phase_seconds[key] = self._phase_seconds.get(key, 0.0) + seconds

    def server(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Record server-side metrics of the global model after a round."""
        for name, value in metrics.items():
            self._server.append((server_round, None, "server", name, float(value)))

    def save_global_model(self, server_round: int, arrays: Mapping[str, Any]) -> Path:
        """Save the global model's arrays as ``checkpoints/global.npz`` (atomic).

        The file holds the arrays under their state-dict names and the round
        under ``__round__``; it always holds the latest completed round.
        """
        path = self.run_dir / CHECKPOINTS_DIR / GLOBAL_CHECKPOINT
        payload = {k: np.asarray(v) for k, v in arrays.items()}
        payload["__round__"] = np.asarray(server_round)
        _atomic_write(path, lambda p: _savez(p, payload))
        return path

    # -- resume ----------------------------------------------------------------------
    def resume_state(self) -> dict[str, Any]:
        """What a resumed run's recorder continues from (with ``metrics.parquet``):
        the failures so far, the run's elapsed seconds and its summary's
        ``started_at`` and ``resumed``."""
        return {
            "failures": list(self.failures),
            "elapsed": time.time() - self.started,
            "started_at": self.summary["started_at"],
            "resumed": list(self.summary.get("resumed", [])),
            "placement": self.placement.as_json(),
        }

    def resume(self, server_round: int, state: Mapping[str, Any]) -> None:
        """Continue a run after its completed round ``server_round``.

        The rows of rounds up to ``server_round`` are read back from
        ``metrics.parquet`` (those of a round after it, which died before its
        checkpoint, are dropped); failures and elapsed time come from ``state``
        (:meth:`resume_state`); ``summary.json`` keeps its ``started_at`` and
        lists the resumptions under ``resumed``.
        """
        frame = read_metrics(self.run_dir)
        rows: list[tuple[int, int | None, str, str, float]] = []
        if frame is not None:
            frame = frame[frame["round"] <= server_round]
            for rnd, client, phase, name, value in frame.itertuples(index=False):
                who = None if pd.isna(client) else int(client)
                rows.append((int(rnd), who, str(phase), str(name), float(value)))
        self.rows = rows
        self._writer, self._finals, self._scanned = MetricsWriter(), {}, 0
        self._sent = len(rows)  # the sinks had them before the run died
        self.failures = [dict(f) for f in state["failures"]]
        self.placement = Placement(state.get("placement")).up_to(server_round)
        self.rounds_completed = server_round
        self.started = time.time() - float(state["elapsed"])
        resumed = [*state["resumed"], {"after_round": server_round}]
        resumed[-1]["at"] = datetime.now(UTC).isoformat()
        self.summary.update(started_at=state["started_at"], resumed=resumed)
        self.flush()

    # -- round and run boundaries ------------------------------------------------
    def end_round(self, server_round: int) -> None:
        """Aggregate the round's client rows and rewrite ``metrics.parquet``.

        Only completed rounds reach the file: rows of a round that never ends
        (a crash) are left out.
        """
        self._client_rows(server_round)
        self.rows.extend(row for row in self._server if row[0] <= server_round)
        self._server = [row for row in self._server if row[0] > server_round]
        self.rows.append(
            (server_round, None, "server", "elapsed", time.time() - self.started)
        )
        self.rounds_completed = server_round
        self._publish(server_round)

    def end_failed_round(self) -> None:
        """Write what the clients did in the round that ended the run (e.g. too
        few replies): every failure gets its row, as in a completed round, but
        the round does not count as completed and has no server rows."""
        keys = {*self._pending, *self._strategy, *self._phase_seconds}
        if keys:
            server_round = max(rnd for rnd, _ in keys)
            self._client_rows(server_round)
            self._publish(server_round)

    def _publish(self, server_round: int) -> None:
        self.flush()
        new, self._sent = self.rows[self._sent :], len(self.rows)
        for sink in self.sinks:
            sink.log_round(server_round, new)

    def _client_rows(self, server_round: int) -> None:
        """Per-client rows of rounds up to ``server_round``, and their aggregates."""
        keys = {*self._pending, *self._strategy, *self._phase_seconds}
        for rnd, phase in sorted(k for k in keys if k[0] <= server_round):
            replies = sorted(self._pending.pop((rnd, phase), {}).items())
            for client, values in replies:
                for name, value in values.items():
                    self.rows.append((rnd, client, phase, name, value))
            if replies:
                for name, value in aggregate_replies(replies).items():
                    self.rows.append((rnd, None, phase, name, value))
            for name, value in self._strategy.pop((rnd, phase), {}).items():
                self.rows.append((rnd, None, phase, name, value))
            if (rnd, phase) in self._phase_seconds:
                seconds = self._phase_seconds.pop((rnd, phase))
                self.rows.append((rnd, None, phase, "seconds", seconds))

    def flush(self) -> None:
        """Rewrite metrics and summary atomically."""
        self._writer.write(self.rows, self.run_dir / METRICS_FILE)
        self._write_summary()

    def finish(self, status: str, reason: str | None = None) -> None:
        """Write the final summary (``completed``, ``failed``, ``stopped``...).

        The final status is written last, after the trackers closed: the CLI
        ends the run's processes as soon as it reads it."""
        self.summary.update(finished_at=datetime.now(UTC).isoformat())
        self.flush()
        for sink in self.sinks:
            sink.close(status)
        self.summary.update(status=status, reason=reason)
        self._write_summary()

    @contextmanager
    def recording(self) -> Iterator[RunRecorder]:
        """Finish as ``completed``, ``stopped`` (:class:`RunStopped`) or ``failed``
        with the error as reason."""
        try:
            yield self
        except RunStopped as err:
            self.finish("stopped", str(err))
        except RoundFailed as err:
            self.end_failed_round()
            self.finish("failed", str(err))
        except BaseException as err:
            self.finish("failed", f"{type(err).__name__}: {err}")
            raise
        else:
            self.finish("completed")

    def _final(self) -> dict[str, float]:
        """Latest ``accuracy``/``loss`` of the headline phase (``server``: the
        global model on the held-out test set; ``evaluate``: the clients' local
        evaluation, for families without a global model) and the latest
        ``evaluate_accuracy``/``evaluate_loss``."""
        final = self._finals
        for _, client, phase, name, value in self.rows[self._scanned :]:
            if client is None and name in ("accuracy", "loss", "perplexity"):
                if phase == self.headline:
                    final[name] = value
                if phase == "evaluate":
                    final[f"evaluate_{name}"] = value
        self._scanned = len(self.rows)
        return dict(final)

    def _write_summary(self) -> None:
        self.summary.update(
            rounds_completed=self.rounds_completed,
            wall_seconds=round(time.time() - self.started, 3),
            final=self._final(),
            failures=len(self.failures),
            failure_details=self.failures[:100],
        )
        if self.placement:
            self.summary["placement"] = self.placement.as_json()
        write_json(self.run_dir / SUMMARY_FILE, self.summary)
