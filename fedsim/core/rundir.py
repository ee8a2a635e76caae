"""The run-directory format, shared by its writer and its readers.

A run directory (``runs/<name>-<timestamp>``) holds:

- ``config.toml``: the resolved experiment.
- ``metrics.parquet``: the round metrics in long format (:data:`COLUMNS`:
  ``round``, ``client``, ``phase``, ``metric``, ``value``; ``client`` is the
  partition id, null on aggregated and server rows). Phases: ``train`` and
  ``evaluate`` (per-client rows and their aggregate) and ``server`` (server-side
  evaluation of the global model on the held-out test set, round 0 being the
  initial model). The file is rewritten atomically each time a round completes.
- ``summary.json``: status, timings and final metrics, written when the run starts
  and again when it ends. Its ``headline`` key names the phase whose aggregated
  accuracy and loss are the run's headline (:data:`HEADLINE_PHASES`); runs
  recorded before the key existed are ``server`` runs.
- ``checkpoints/global.npz``: the latest global model.
- ``checkpoints/resume.npz``: what ``fedsim run --resume`` continues from
  (:mod:`fedsim.engine.server.resume_checkpoint`), and ``checkpoints/clients/``: the
  clients' private state (:mod:`fedsim.engine.client.client_state`).

The engine's run recorder writes run directories; :mod:`fedsim.analysis` and the
CLI's progress display read them. This module is what both sides agree on; being
part of the core, it imports neither.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pandas is imported where frames are made (not by clients)
    import pandas as pd

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.parquet"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
GLOBAL_CHECKPOINT = "global.npz"
RESUME_CHECKPOINT = "resume.npz"
#: Under ``checkpoints/``: one folder per client partition with its private state.
CLIENT_STATE_DIR = "clients"
COLUMNS = ("round", "client", "phase", "metric", "value")
#: The dtypes of :data:`COLUMNS` (``client`` is nullable).
DTYPES: Mapping[str, str] = {
    "round": "int64",
    "client": "Int64",
    "phase": "string",
    "metric": "string",
    "value": "float64",
}

#: Per-client metrics whose aggregate row is a sum rather than a weighted mean.
SUMMED = frozenset({"examples", "bytes-up", "bytes-down"})

#: The privacy audit's per-client metric: best-match PSNR (dB) of the
#: reconstructions of what the client uploaded (``train`` rows).
ATTACK_PSNR = "attack-psnr"
#: The privacy audit's per-client count of images recovered (matched one to
#: one above ``audit.recovered-db``).
RECOVERED = "recovered"
#: The phase the privacy audit's seconds are recorded under.
AUDIT_PHASE = "audit"
#: Per-client metrics whose aggregate is the plain mean over the clients that
#: report them, not weighted by examples (also their per-attack variants,
#: ``<metric>/<attack>``: :func:`unweighted`).
UNWEIGHTED = frozenset({ATTACK_PSNR, RECOVERED})


def per_attack(metric: str, attack: str) -> str:
    """The name of an audit metric for one attack: ``<metric>/<attack>``."""
    return f"{metric}/{attack}"


def unweighted(name: str) -> bool:
    """Whether a per-client metric aggregates as a plain mean (:data:`UNWEIGHTED`
    and their per-attack variants)."""
    return name.split("/", 1)[0] in UNWEIGHTED


#: ``summary.json`` key naming the run's headline phase.
HEADLINE_KEY = "headline"
#: Phases a run's headline accuracy and loss can come from: ``server`` (the global
#: model on the held-out test set) or ``evaluate`` (the clients' local evaluation,
#: aggregated, for strategy families without a global model).
HEADLINE_PHASES = ("server", "evaluate")
#: The headline phase of a summary without :data:`HEADLINE_KEY` (older runs).
DEFAULT_HEADLINE = "server"

#: One metric value: (round, client or None, phase, metric, value).
Row = tuple[int, int | None, str, str, float]


class RoundSink(Protocol):
    """Also receives each closed round's rows (e.g. an experiment tracker)."""

    def log_round(self, server_round: int, rows: Sequence[Row]) -> None:
        """Rows (round, client, phase, metric, value) added by ``end_round``."""

    def close(self, status: str) -> None:
        """The run ended with ``status`` (``completed``, ``failed``...)."""


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` through a temporary file beside it, then rename it in place.

    Parameters
    ----------
    path : Path
        The file to (re)write.
    write : callable
        Writes the content to the path it is given (the temporary file).

    Notes
    -----
    The rename is atomic, so a reader sees either the old file or the new one,
    never half of one.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file).

    Parameters
    ----------
    path : Path
        The file to (re)write, e.g. ``summary.json``.
    payload : Mapping
        A JSON-serialisable mapping, written indented with a final newline.
    """
    atomic_write(
        path, lambda p: p.write_text(json.dumps(payload, indent=2) + "\n", "utf-8")
    )


def metrics_frame(rows: list[Row]) -> pd.DataFrame:
    """Rows as the long-format DataFrame of ``metrics.parquet``.

    Parameters
    ----------
    rows : list of Row
        ``(round, client, phase, metric, value)`` tuples.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS` with their :data:`DTYPES`.
    """
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype(dict(DTYPES))


class MetricsWriter:
    """Writes a growing list of rows as ``metrics.parquet``, converting only the
    rows added since its last write.

    Rewriting the whole file from Python tuples every round made a round's
    recording grow with the run (a 1,000-client run adds about 600 rows a
    round). The rows already written are kept as Arrow tables; the file holds
    the same columns, dtypes and rows as ``metrics_frame(rows).to_parquet``.
    """

    #: Chunks kept before they are merged into one.
    MERGE_AFTER = 32

    def __init__(self) -> None:
        self._chunks: list[Any] = []
        self._converted = 0

    def write(self, rows: Sequence[Row], path: Path) -> None:
        """Write ``rows`` (the rows of the previous write, plus new ones at the
        end) to ``path`` atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if len(rows) < self._converted:
            raise ValueError("rows were removed since the last write")
        new = list(rows[self._converted :])
        if new or not self._chunks:
            frame = metrics_frame(new)
            self._chunks.append(pa.Table.from_pandas(frame, preserve_index=False))
            self._converted = len(rows)
        if len(self._chunks) > self.MERGE_AFTER:
            self._chunks = [pa.concat_tables(self._chunks).combine_chunks()]
        table = pa.concat_tables(self._chunks)
        atomic_write(path, lambda p: pq.write_table(table, p))


def read_metrics(run_dir: Path) -> pd.DataFrame | None:
    """``metrics.parquet`` of a run directory, or None while there is none.

    The file is read in one go: pyarrow given a path may stat it and open it on
    either side of the recorder's atomic replace and fail, while the bytes of one
    open file are always one whole version, even during a run.

    Parameters
    ----------
    run_dir : Path
        A run directory.

    Returns
    -------
    pandas.DataFrame or None
        The metrics as written, or None if the file does not exist yet.
    """
    try:
        data = (run_dir / METRICS_FILE).read_bytes()
    except FileNotFoundError:
        return None
    import pandas as pd

    return pd.read_parquet(io.BytesIO(data))


def headline_phase(summary: Mapping[str, Any]) -> str:
    """The phase whose aggregated accuracy and loss are a run's headline.

    Parameters
    ----------
    summary : Mapping
        ``summary.json`` as read (empty before the run has written it).

    Returns
    -------
    str
        ``summary["headline"]``, or :data:`DEFAULT_HEADLINE` where the key is
        absent or null (runs recorded before it existed).

    Raises
    ------
    ValueError
        The key holds something other than one of :data:`HEADLINE_PHASES`.
    """
    value = summary.get(HEADLINE_KEY)
    if value is None:
        return DEFAULT_HEADLINE
    if value not in HEADLINE_PHASES:
        allowed = ", ".join(HEADLINE_PHASES)
        raise ValueError(f"{HEADLINE_KEY} {value!r} is not one of {allowed}")
    return str(value)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``summary.json`` of a run directory ({} when missing or unreadable)."""
    try:
        return dict(json.loads((run_dir / SUMMARY_FILE).read_text("utf-8")))
    except (OSError, ValueError):
        return {}


#: Final statuses the ServerApp writes into ``summary.json``.
ENDED = ("completed", "failed", "stopped")


def ended(summary: dict[str, Any], before: str | None) -> bool:
    """Whether the ServerApp wrote a final status since ``before`` (the
    ``finished_at`` the run directory held when the run was submitted)."""
    return summary.get("status") in ENDED and summary.get("finished_at") != before


def aggregate_replies(replies: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Aggregate rows of one phase: sums for counts, example-weighted means else.

    Sums include failed clients (bytes were sent to them all the same); means use
    successful replies only (plain means for ``UNWEIGHTED`` metrics). ``failed``
    becomes ``failures`` (a count), ``clients`` counts successful replies, and
    per-client ``seconds`` is left out (the phase's wall time is recorded instead).
    """
    ok = [values for _, values in replies if "failed" not in values]
    out: dict[str, float] = {
        "clients": float(len(ok)),
        "failures": float(len(replies) - len(ok)),
    }
    for name in sorted(SUMMED):
        sent = [values[name] for _, values in replies if name in values]
        if sent:
            out[name] = sum(sent)
    names = sorted({name for values in ok for name in values} - {"seconds"} - SUMMED)
    for name in names:
        have = [v for v in ok if name in v]
        plain = unweighted(name)
        weights = [1.0 if plain else v.get("examples", 0.0) for v in have]
        total = sum(weights)
        if total > 0:
            out[name] = sum(w * v[name] for w, v in zip(weights, have)) / total
        else:
            out[name] = sum(v[name] for v in have) / len(have)
    return out
