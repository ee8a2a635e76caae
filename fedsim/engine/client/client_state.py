"""The clients' private state, kept in the run directory for ``--resume``.

Client algorithms keep what they must remember across rounds in Flower's
``context.state``: DP-SGD's accountant history, HyperFL's private embedding and
head, the local baseline's model. In simulation that state lives in the
simulation runtime (on the SuperLink's side), so it dies with an interrupted run
and a resumed run would start every client afresh. The ClientApp therefore
writes a client's state to ``checkpoints/clients/<partition-id>/<round>.pb``
(Flower's own protobuf serialisation of a ``RecordDict``, written atomically)
after each reply, and a resumed run's client loads the newest one once, before
its first message.

A client writes at round ``r`` only while round ``r`` runs, and the newest
three files of each partition are kept: the server closes round ``r - 1``
(and writes its resume checkpoint) while round ``r`` runs
(:mod:`fedsim.engine.server.round_driver`), so the checkpoint covers round ``r - 2`` at
least, and whatever the moment a run dies, one file is from a round it
covers. A resume first deletes the files of rounds after its checkpoint
(:meth:`ClientStateStore.prune_after`), so the newest remaining file is the
client's state at the checkpoint.

In simulation the state travels with the message: Flower's runtime sends a
client's ``Context`` to the Ray actor with each message and takes it back with
the reply, so the simulation process, on the host of the run directory,
saves and restores it (:func:`relay_before`, :func:`relay_after`, called by
:mod:`fedsim.flwr_private.vce`) and marks it :data:`RELAYED` so that the ClientApp
leaves the store alone. Which node of a Ray cluster ran the client does not
matter: a resumed run finds every client's state.

Deployment caveat: there the ClientApp writes the store, only where the client
process sees the run directory (one machine, or a filesystem shared by the
SuperLink and the SuperNodes at the same path). A SuperNode on another host
keeps its state in its own ``context.state`` only; a resumed deployment run
would start those clients' private state afresh, so resume such runs only with
a shared run directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, RecordDict

from fedsim.core.loading import RESUME_KEY, RUN_DIR_KEY, SWEEP_KEY
from fedsim.core.messages import EXPERIMENT, PARTITION_ID, SERVER_ROUND
from fedsim.core.rundir import CHECKPOINTS_DIR, CLIENT_STATE_DIR, atomic_write
from fedsim.flwr_private import recorddict_from_bytes, recorddict_to_bytes

#: Keys of ``context.state`` starting with this prefix are the engine's own
#: bookkeeping (a sweep's owner, the restore marker), never saved.
ENGINE_PREFIX = "fedsim-"
#: Marker set in ``context.state`` once a resumed client has loaded its state.
RESTORED = "fedsim-restored"
#: Set in ``context.state`` by the simulation process, which keeps the client's
#: state itself (see the module docstring).
RELAYED = "fedsim-relayed"
#: Files kept per partition (see the module docstring).
KEEP = 3
_NAME = re.compile(r"^(\d+)\.pb$")


def to_bytes(state: RecordDict) -> bytes:
    """A ``RecordDict`` as Flower serialises it."""
    return recorddict_to_bytes(state)


def from_bytes(data: bytes) -> RecordDict:
    """Inverse of :func:`to_bytes`."""
    return recorddict_from_bytes(data)


class ClientStateStore:
    """Per-partition snapshots of ``context.state`` under a run directory.

    Parameters
    ----------
    run_dir : Path
        The run directory; files go to ``checkpoints/clients/``.
    """

    def __init__(self, run_dir: Path):
        self.root = run_dir / CHECKPOINTS_DIR / CLIENT_STATE_DIR

    def _files(self, partition_id: int) -> list[tuple[int, Path]]:
        folder = self.root / str(partition_id)
        if not folder.is_dir():
            return []
        found = []
        for path in folder.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, partition_id: int, server_round: int, state: RecordDict) -> None:
        """Write the client's state after a reply of ``server_round`` (nothing
        when it holds only the engine's bookkeeping); keep the newest
        :data:`KEEP` rounds."""
        kept = RecordDict(
            {k: v for k, v in state.items() if not k.startswith(ENGINE_PREFIX)}
        )
        if not kept:
            return
        folder = self.root / str(partition_id)
        folder.mkdir(parents=True, exist_ok=True)
        data = to_bytes(kept)
        atomic_write(folder / f"{server_round:06d}.pb", lambda p: p.write_bytes(data))
        for _, path in self._files(partition_id)[:-KEEP]:
            path.unlink(missing_ok=True)

    def load(self, partition_id: int) -> tuple[int, RecordDict] | None:
        """The newest saved state of a partition and its round, or None."""
        files = self._files(partition_id)
        if not files:
            return None
        server_round, path = files[-1]
        return server_round, from_bytes(path.read_bytes())

    def prune_after(self, server_round: int) -> None:
        """Delete the states saved in rounds after ``server_round`` (a round
        the resume checkpoint does not cover)."""
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.name.isdigit():
                for rnd, path in self._files(int(folder.name)):
                    if rnd > server_round:
                        path.unlink(missing_ok=True)

    def restore_into(self, partition_id: int, state: RecordDict) -> None:
        """Once per client of a resumed run: put its newest saved state into
        ``state`` (its ``context.state``)."""
        if RESTORED in state:
            return
        saved = self.load(partition_id)
        if saved is not None:
            for key, record in saved[1].items():
                state[key] = record
        state[RESTORED] = ConfigRecord({"round": saved[0] if saved else 0})


@lru_cache(maxsize=2)
def _sweep(text: str) -> tuple[dict[str, Any], ...]:
    return tuple(entry["config"] for entry in json.loads(text))


def _target(
    run_config: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[ClientStateStore, int, bool] | None:
    """The store, partition and resume flag of a message with ``config`` in a
    fedsim run (in a sweep: of the experiment ``config`` names); None for
    messages of no fedsim run."""
    if SWEEP_KEY in run_config:
        if EXPERIMENT not in config:
            return None
        run_config = _sweep(str(run_config[SWEEP_KEY]))[int(config[EXPERIMENT])]
    run_dir = str(run_config.get(RUN_DIR_KEY, ""))
    if not run_dir or PARTITION_ID not in config:
        return None
    resume = bool(run_config.get(RESUME_KEY))
    return ClientStateStore(Path(run_dir)), int(config[PARTITION_ID]), resume


def relay_before(config: Mapping[str, Any], context: Context) -> None:
    """In the simulation process, before a message with ``config`` goes to
    the client: a resumed run's client gets its saved state, and every
    client the :data:`RELAYED` mark."""
    target = _target(context.run_config, config)
    if target is None:
        return
    store, partition_id, resume = target
    if resume:
        store.restore_into(partition_id, context.state)
    context.state[RELAYED] = ConfigRecord()


def relay_after(config: Mapping[str, Any], context: Context) -> None:
    """In the simulation process, once the client replied to a message with
    ``config``: save its state (``context`` as it came back)."""
    target = _target(context.run_config, config)
    if target is not None:
        store, partition_id, _ = target
        server_round = int(config.get(SERVER_ROUND, 0))
        store.save(partition_id, server_round, context.state)
