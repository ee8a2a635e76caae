"""The server-side auditor: watches the round's exchanges, attacks after the round.

:class:`Auditor` is handed every exchange the recording grid runs
(:meth:`Auditor.observe`) and, after each audited round, before the round is
closed (:meth:`Auditor.after_round`), attacks what the first ``audit.clients``
training clients uploaded. It scores each reconstruction by its best PSNR
against the images of the client's partition, which the server builds from
the same seeded split (nothing comes from the client), records
``attack-psnr`` in the round's ``train`` rows (their mean in the aggregated
row), the attack's wall time as the ``audit`` phase's ``seconds``, and writes
``attacks/round-<r>-client-<id>.png`` (top: best-matching originals; bottom:
reconstructions). The attack (:func:`fedsim.audit.inverting.invert`, which
hands split learning's activation scenes to
:func:`fedsim.audit.activations.invert_activations`) draws from its own
``torch.Generator``, runs under ``torch.random.fork_rng`` and uses its own copy
of the model, so training is the same with or without the audit.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict

from fedsim.audit.inverting import Surface, invert
from fedsim.audit.maths import best_matches, image_grid
from fedsim.audit.replay import Public
from fedsim.core.experiment import Experiment
from fedsim.core.family import load
from fedsim.core.messages import ARRAYS, CUT
from fedsim.core.rundir import ATTACK_PSNR, AUDIT_PHASE
from fedsim.core.seeding import derive_seed
from fedsim.learn.data import FederatedData

#: Folder of the run directory holding the reconstruction grids.
ATTACKS_DIR = "attacks"
#: PSNR reported for an exact reconstruction (the formula gives infinity).
PSNR_CAP = 100.0
#: Most reconstructions drawn in one grid.
GRID_COLUMNS = 16


class Auditor:
    """Attacks training uploads of the rounds ``experiment.audit.rounds``.

    Parameters
    ----------
    experiment : Experiment
        The run's experiment (``[audit]``, the public hyper-parameters).
    data : FederatedData
        The seeded partitions, to score reconstructions.
    recorder : Any
        The run's :class:`fedsim.engine.recorder.RunRecorder`.
    surface : str
        The family's ``Family.audit`` (``"module:callable"``).
    """

    def __init__(
        self, experiment: Experiment, data: FederatedData, recorder: Any, surface: str
    ):
        self.experiment = experiment
        self.settings = experiment.audit
        self.data = data
        self.recorder = recorder
        self.surface: Surface = load(surface)
        self._seen: dict[int, tuple[RecordDict, RecordDict]] = {}

    def observe(
        self,
        server_round: int,
        messages: list[Message],
        replies: list[Message],
        partition_of: Mapping[int, int],
    ) -> None:
        """Keep, per client, the latest training exchange of an audited round
        whose message carries ``arrays`` and whose reply carries ``arrays`` (an
        upload of weights) or ``cut`` (split learning's activations: only the
        round's ``train`` exchange, the client's first batch, qualifies; see
        :mod:`fedsim.audit.activations`). References only."""
        if server_round not in self.settings.rounds or not messages:
            return
        if messages[0].metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return
        sent = {m.metadata.dst_node_id: m.content for m in messages}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or node not in sent:
                continue
            up = reply.content
            if ARRAYS in sent[node] and (ARRAYS in up or CUT in up):
                self._seen[partition_of[node]] = (sent[node], reply.content)

    def after_round(self, server_round: int) -> None:
        """Attack the round's chosen clients and record the results."""
        seen, self._seen = self._seen, {}
        if server_round not in self.settings.rounds or not seen:
            return
        start = time.perf_counter()
        public = Public(self.experiment, self.data.info, server_round)
        for pid in sorted(seen)[: self.settings.clients]:
            sent, reply = seen[pid]
            value = self.attack(server_round, pid, sent, reply, public)
            if value is None:  # nothing uploaded to attack (no training examples)
                continue
            self.recorder.client(
                server_round, MessageType.TRAIN, pid, {ATTACK_PSNR: value}
            )
        self.recorder.phase_seconds(
            server_round, AUDIT_PHASE, time.perf_counter() - start
        )

    def attack(
        self,
        server_round: int,
        pid: int,
        sent: RecordDict,
        reply: RecordDict,
        public: Public,
    ) -> float | None:
        """One client's reconstruction, its mean best PSNR, and its grid (None
        when the upload held no example)."""
        exp = self.experiment
        labels = None
        if self.settings.labels == "known":
            labels = self.data.client(pid).train.y
        generator = torch.Generator().manual_seed(
            derive_seed(exp.seed, "audit", server_round, pid)
        )
        with torch.random.fork_rng(devices=[]):
            rec = invert(
                sent,
                reply,
                public,
                surface=self.surface,
                settings=self.settings,
                generator=generator,
                labels=labels,
            )
        if not len(rec.images):
            return None
        images = self.data.pool.x[self.data.partitions[pid]]
        index, scores = best_matches(rec.images, images)
        scores = np.minimum(scores, PSNR_CAP)
        if rec.images.ndim == 4:
            self.write_grid(server_round, pid, images[index], rec.images)
        return float(scores.mean())

    def write_grid(
        self, server_round: int, pid: int, originals: np.ndarray, rec: np.ndarray
    ) -> Path:
        """``attacks/round-<r>-client-<id>.png``: originals above reconstructions."""
        from matplotlib.image import imsave

        folder = self.recorder.run_dir / ATTACKS_DIR
        folder.mkdir(exist_ok=True)
        path = folder / f"round-{server_round}-client-{pid}.png"
        grid = image_grid([originals[:GRID_COLUMNS], rec[:GRID_COLUMNS]])
        imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)
        return path
