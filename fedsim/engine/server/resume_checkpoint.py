"""The resume checkpoint: everything the rounds after round k depend on.

After every completed round (its rows already in ``metrics.parquet``) the round
driver writes ``checkpoints/resume.npz`` atomically (a crash while writing
leaves the previous checkpoint whole). It holds:

- ``round``: the last completed round;
- ``config``: the SHA-256 of ``config.toml`` when the run started (a resume
  refuses a run directory whose config changed);
- ``arrays``: the round driver's global arrays (None without a global model);
- ``strategy``: the state of every stateful strategy of the wrapper chain, from
  the outermost in (:func:`strategy_state`): e.g. HyperFL's hypernetwork,
  DP-FedAvg's accountant, clipping norm and noise generator, DP-SGD's declined
  clients;
- ``rng``: the server process's Python ``random``, numpy and torch generator
  states (Flower's sampler draws from ``random``, which
  :class:`fedsim.engine.server.strategy_recording.RecordingStrategy` also
  reseeds per phase);
- ``recorder``: the failures recorded so far and the run's elapsed seconds.

Clients keep their private state (DP-SGD accountants, HyperFL's embedding and
head, the local baseline's model) in Flower's ``context.state``, which lives in
the simulation runtime and dies with it; it is saved by the client side
(:mod:`fedsim.engine.client.client_state`).

A strategy takes part by implementing
:class:`fedsim.protocol.contract.ServerState` (``checkpoint_state() -> dict`` of
JSON values and numpy arrays, nested, and ``restore_state(state)``); a family
whose server keeps state declares it (``Family.server_state``) and the engine
checks the two agree (:func:`fedsim.protocol.contract.check_server_state`). The
file is an ``.npz`` without pickles: the arrays under generated keys, the rest
as JSON.
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedsim.core.errors import ConfigError
from fedsim.core.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    RESUME_CHECKPOINT,
    SUMMARY_FILE,
    atomic_write,
)
from fedsim.protocol.contract import stateful

#: Format version of ``resume.npz``.
VERSION = 1
#: Statuses a run directory can be resumed from (``running``: the process died).
RESUMABLE = ("running", "failed", "interrupted")
_TREE = "__tree__"
_ARRAY = "__array__"


def config_digest(run_dir: Path) -> str:
    """SHA-256 of the run directory's ``config.toml``."""
    return hashlib.sha256((run_dir / CONFIG_FILE).read_bytes()).hexdigest()


# -- a tree of JSON values and arrays as one npz ------------------------------------
def pack(tree: Any) -> dict[str, np.ndarray]:
    """``tree`` (dicts, lists, JSON scalars, numpy arrays) as npz entries: each
    array under its own key, the rest as JSON under ``__tree__``."""
    arrays: dict[str, np.ndarray] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, np.ndarray):
            key = f"a{len(arrays)}"
            arrays[key] = node
            return {_ARRAY: key}
        if isinstance(node, Mapping):
            return {str(k): walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v) for v in node]
        if isinstance(node, np.generic):
            return node.item()
        return node

    arrays[_TREE] = np.asarray(json.dumps(walk(tree)))
    return arrays


def unpack(entries: Mapping[str, np.ndarray]) -> Any:
    """The tree :func:`pack` packed (tuples come back as lists)."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {_ARRAY}:
                return np.asarray(entries[node[_ARRAY]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(json.loads(str(entries[_TREE])))


def write_checkpoint(run_dir: Path, tree: Mapping[str, Any]) -> Path:
    """Write ``checkpoints/resume.npz`` atomically."""
    path = run_dir / CHECKPOINTS_DIR / RESUME_CHECKPOINT
    entries = pack({"version": VERSION, **tree})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object keeps numpy from adding .npz
            np.savez(fh, **entries)  # type: ignore[arg-type]

    atomic_write(path, write)
    return path


def read_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The resume checkpoint of ``run_dir``, or None without one."""
    path = run_dir / CHECKPOINTS_DIR / RESUME_CHECKPOINT
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            tree = unpack({k: npz[k] for k in npz.files})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(
            f"--resume: {path} is damaged ({type(err).__name__}); the run cannot be "
            "resumed, start it again"
        ) from None
    if tree.get("version") != VERSION:
        raise ConfigError(
            f"--resume: {path} has format version {tree.get('version')!r}; this "
            f"fedsim resumes version {VERSION}"
        )
    return dict(tree)


# -- global arrays ------------------------------------------------------------------
def arrays_state(arrays: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    """An ArrayRecord as ordered numpy arrays (None stays None)."""
    return None if arrays is None else {k: a.numpy() for k, a in arrays.items()}


def arrays_record(state: Mapping[str, np.ndarray] | None) -> ArrayRecord | None:
    """Inverse of :func:`arrays_state` (same keys, order, dtypes, values)."""
    if state is None:
        return None
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


# -- random number generators -------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The process's Python ``random``, numpy and torch (CPU) generator states."""
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state().numpy(),
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the generators :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = dict(numpy_state["state"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8)))


# -- the strategy wrapper chain ------------------------------------------------------
def strategy_state(strategy: Any) -> list[dict[str, Any]]:
    """``checkpoint_state()`` of every strategy of the wrapper chain that keeps
    :class:`fedsim.protocol.contract.ServerState`, outermost first."""
    return [
        {"class": type(s).__qualname__, "state": s.checkpoint_state()}
        for s in stateful(strategy)
    ]


def restore_strategy(strategy: Any, states: list[dict[str, Any]]) -> None:
    """Hand each stateful strategy of the chain its saved state.

    Raises
    ------
    ValueError
        The chain's stateful strategies differ from the checkpoint's.
    """
    found = stateful(strategy)
    names = [type(s).__qualname__ for s in found]
    saved = [entry["class"] for entry in states]
    if names != saved:
        raise ValueError(
            f"the checkpoint holds the state of {saved}, the strategy is {names}"
        )
    for s, entry in zip(found, states, strict=True):
        s.restore_state(entry["state"])


# -- may this run directory be resumed? ---------------------------------------------
def check_resumable(run_dir: Path) -> dict[str, Any]:
    """The checkpoint of a run directory that ``--resume`` may continue.

    Raises
    ------
    ConfigError
        One line: not a run directory, the run completed or stopped, no round
        was checkpointed, or ``config.toml`` changed since the run started.
    """
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            f"--resume: {run_dir} is not a run directory (no config.toml)"
        )
    try:
        status = json.loads((run_dir / SUMMARY_FILE).read_text("utf-8"))["status"]
    except (OSError, ValueError, KeyError):
        status = "running"  # died before or while writing its summary
    if status not in RESUMABLE:
        raise ConfigError(
            f"--resume: {run_dir} ended with status {status!r}; only a run that "
            f"failed, was interrupted or died can be resumed"
        )
    checkpoint = read_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(
            f"--resume: {run_dir} has no checkpoint (no round completed); start it "
            "again instead"
        )
    if checkpoint["config"] != config_digest(run_dir):
        raise ConfigError(
            f"--resume: {run_dir / CONFIG_FILE} changed since the run started; "
            "a resumed run must continue the same experiment"
        )
    return checkpoint
