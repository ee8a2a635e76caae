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
(:mod:`fedsim.engine.rounds`), so the checkpoint covers round ``r - 2`` at
least, and whatever the moment a run dies, one file is from a round it
covers. A resume first deletes the files of rounds after its checkpoint
(:meth:`ClientStateStore.prune_after`), so the newest remaining file is the
client's state at the checkpoint.

Deployment caveat: the store is written only where the client process sees the
run directory (one machine, or a filesystem shared by the SuperLink and the
SuperNodes at the same path). A SuperNode on another host keeps its state in its
own ``context.state`` only; a resumed deployment run would start those clients'
private state afresh, so resume such runs only with a shared run directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedsim.core.rundir import CHECKPOINTS_DIR, CLIENT_STATE_DIR, atomic_write

#: Keys of ``context.state`` starting with this prefix are the engine's own
#: bookkeeping (a sweep's owner, the restore marker), never saved.
ENGINE_PREFIX = "fedsim-"
#: Marker set in ``context.state`` once a resumed client has loaded its state.
RESTORED = "fedsim-restored"
#: Files kept per partition (see the module docstring).
KEEP = 3
_NAME = re.compile(r"^(\d+)\.pb$")


def to_bytes(state: RecordDict) -> bytes:
    """A ``RecordDict`` as Flower serialises it."""
    return bytes(recorddict_to_proto(state).SerializeToString())


def from_bytes(data: bytes) -> RecordDict:
    """Inverse of :func:`to_bytes`."""
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


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
