"""The server-side auditor: watches the round's exchanges, attacks after the round.

:class:`Auditor` is handed every exchange the recording grid runs
(:meth:`Auditor.observe`) and, after each audited round, before the round is
closed (:meth:`Auditor.after_round`), attacks what the first ``audit.clients``
training clients uploaded with every attack of ``audit.attack``
(:data:`ATTACKS`). It scores each attack's reconstructions one to one against
the images the client trained on, which the server rebuilds from the same
seeded split (nothing comes from the client): the Hungarian assignment on PSNR
(:func:`fedsim.audit.maths.one_to_one`), so eight copies of one image recover
one image. It records per attack ``attack-psnr/<attack>`` (the matched pairs'
mean PSNR) and ``recovered/<attack>`` (pairs above ``audit.recovered-db``), and
their best over the attacks that applied as ``attack-psnr`` and ``recovered``,
in the round's ``train`` rows (plain means in the aggregated row); the attacks'
wall time as the ``audit`` phase's ``seconds``; and
``attacks/round-<r>-client-<id>-<attack>.png`` (top: the matched originals;
bottom: reconstructions). An attack whose assumptions fail for an upload
(:class:`fedsim.audit.analytic.NotApplicable`) records nothing and logs why
(:attr:`Auditor.skipped` keeps the reasons). The attacks draw from their own
``torch.Generator``, run under ``torch.random.fork_rng`` and use their own
copies of the model, so training is the same with or without the audit.

Split learning: the client's activation uploads of the batches ``audit.batches``
(0: the reply to ``train``), each inverted against the head the server sent in
``train`` (for a later batch the client has stepped its head since: the
attacker does not know how, and uses the sent one; see
:mod:`fedsim.audit.activations`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType, RecordDict

from fedsim.audit.analytic import NotApplicable, analytic
from fedsim.audit.inverting import Surface, invert
from fedsim.audit.loop import Reconstruction
from fedsim.audit.maths import image_grid, one_to_one
from fedsim.audit.replay import Public
from fedsim.core.audit_config import AUDIT_ATTACKS
from fedsim.core.experiment import Experiment
from fedsim.core.family import load
from fedsim.core.messages import ACTIVATIONS, ARRAYS, CUT
from fedsim.core.rundir import ATTACK_PSNR, AUDIT_PHASE, RECOVERED, per_attack
from fedsim.core.seeding import derive_seed
from fedsim.flwr_private import log
from fedsim.learn.data import FederatedData

#: Folder of the run directory holding the reconstruction grids.
ATTACKS_DIR = "attacks"
#: PSNR reported for an exact reconstruction (the formula gives infinity).
PSNR_CAP = 100.0
#: Most reconstructions drawn in one grid.
GRID_COLUMNS = 16

#: ``attack(sent, reply, public, *, surface, settings, generator, labels)``, by
#: the name ``audit.attack`` gives it (Inverting Gradients hands activation
#: scenes to activation inversion).
ATTACKS: dict[str, Callable[..., Reconstruction]] = {
    "inverting-gradients": invert,
    "inverting-activations": invert,
    "analytic": partial(analytic, multistep=False),
    "analytic-multistep": partial(analytic, multistep=True),
}
assert set(ATTACKS) == set(AUDIT_ATTACKS)

#: One upload to attack: the batch (None: a weight upload), the content sent
#: in ``train``, the reply.
Upload = tuple[int | None, RecordDict, RecordDict]


def _activations(content: RecordDict) -> bool:
    """Whether a reply carries cut activations (not, e.g., U-shaped's tail
    gradient, which also travels under ``cut``)."""
    if CUT not in content.array_records:
        return False
    prefix = f"{ACTIVATIONS}."
    return any(k.startswith(prefix) for k in content.array_records[CUT])


class Auditor:
    """Attacks training uploads of the rounds ``experiment.audit.rounds``.

    Parameters
    ----------
    experiment : Experiment
        The run's experiment (``[audit]``, the public hyper-parameters).
    data : FederatedData
        The seeded partitions, to score reconstructions.
    recorder : Any
        The run's :class:`fedsim.engine.server.run_recorder.RunRecorder`.
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
        self._seen: dict[int, list[Upload]] = {}
        self._sent: dict[int, RecordDict] = {}
        self._batch: dict[int, int] = {}
        #: ``(round, partition, attack, reason)`` of every attack not applicable.
        self.skipped: list[tuple[int, int, str, str]] = []

    def observe(
        self,
        server_round: int,
        messages: list[Message],
        replies: list[Message],
        partition_of: Mapping[int, int],
    ) -> None:
        """Keep, per client, the latest training exchange of an audited round
        whose message carries ``arrays`` and whose reply carries ``arrays`` (an
        upload of weights), or the replies carrying ``cut`` activations of the
        batches ``audit.batches`` (split learning: batch 0 answers ``train``,
        batch ``t`` the server's ``t``-th gradient), with the ``train`` content
        sent before them. References only."""
        if server_round not in self.settings.rounds or not messages:
            return
        if messages[0].metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return
        sent = {m.metadata.dst_node_id: m.content for m in messages}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or node not in sent:
                continue
            pid, up = partition_of[node], reply.content
            if ARRAYS in sent[node]:
                self._sent[pid], self._batch[pid] = sent[node], 0
                if ARRAYS in up:
                    self._seen[pid] = [(None, sent[node], up)]
                    continue
            if _activations(up) and pid in self._sent:
                batch = self._batch[pid]
                self._batch[pid] = batch + 1
                if batch in self.settings.batches:
                    entry = (batch, self._sent[pid], up)
                    self._seen.setdefault(pid, []).append(entry)

    def after_round(self, server_round: int) -> None:
        """Attack the round's chosen clients and record the results."""
        seen, self._seen = self._seen, {}
        self._sent, self._batch = {}, {}
        if server_round not in self.settings.rounds or not seen:
            return
        start = time.perf_counter()
        public = Public(self.experiment, self.data.info, server_round)
        for pid in sorted(seen)[: self.settings.clients]:
            values = self.attack_client(server_round, pid, seen[pid], public)
            if values:
                self.recorder.client(server_round, MessageType.TRAIN, pid, values)
        self.recorder.phase_seconds(
            server_round, AUDIT_PHASE, time.perf_counter() - start
        )

    def attack_client(
        self, server_round: int, pid: int, uploads: list[Upload], public: Public
    ) -> dict[str, float]:
        """Every attack on one client's uploads: the per-attack and best rows
        (empty when no attack applied or nothing was uploaded)."""
        values: dict[str, float] = {}
        for attack in self.settings.attack:
            scores: list[float] = []
            recovered = 0
            for batch, sent, reply in uploads:
                try:
                    rec = self.attack(
                        server_round, pid, attack, batch, sent, reply, public
                    )
                except NotApplicable as reason:
                    self.skip(server_round, pid, attack, str(reason))
                    break
                if rec is None:
                    continue
                matched = self.score(server_round, pid, attack, batch, rec)
                scores.extend(matched.tolist())
                recovered += int((matched > self.settings.recovered_db).sum())
            else:
                if scores:
                    values[per_attack(ATTACK_PSNR, attack)] = float(np.mean(scores))
                    values[per_attack(RECOVERED, attack)] = float(recovered)
        for metric in (ATTACK_PSNR, RECOVERED):
            mine = [v for k, v in values.items() if k.split("/")[0] == metric]
            if mine:
                values[metric] = max(mine)
        return values

    def skip(self, server_round: int, pid: int, attack: str, reason: str) -> None:
        """Log (and keep) why an attack does not apply to an upload."""
        self.skipped.append((server_round, pid, attack, reason))
        log(
            WARNING,
            "audit: %s not applicable to client %d's round-%d upload: %s",
            attack,
            pid,
            server_round,
            reason,
        )

    def attack(
        self,
        server_round: int,
        pid: int,
        attack: str,
        batch: int | None,
        sent: RecordDict,
        reply: RecordDict,
        public: Public,
    ) -> Reconstruction | None:
        """One attack's reconstruction of one upload (None when the upload held
        no example)."""
        exp = self.experiment
        labels = None
        if self.settings.labels == "known":
            labels = self.data.client(pid).train.y
        generator = torch.Generator().manual_seed(
            derive_seed(exp.seed, "audit", server_round, pid, attack, batch or 0)
        )
        with torch.random.fork_rng(devices=[]):
            rec = ATTACKS[attack](
                sent,
                reply,
                public,
                surface=self.surface,
                settings=self.settings,
                generator=generator,
                labels=labels,
            )
        return rec if len(rec.images) else None

    def score(
        self,
        server_round: int,
        pid: int,
        attack: str,
        batch: int | None,
        rec: Reconstruction,
    ) -> np.ndarray:
        """The matched pairs' PSNRs (one to one against the images the client
        trained on); writes the grid of the client's first scored upload."""
        images = self.data.client(pid).train.x
        rows, cols, scores = one_to_one(rec.images, images, cap=PSNR_CAP)
        if rec.images.ndim == 4 and not batch:
            self.write_grid(server_round, pid, attack, images[cols], rec.images[rows])
        return scores

    def write_grid(
        self,
        server_round: int,
        pid: int,
        attack: str,
        originals: np.ndarray,
        rec: np.ndarray,
    ) -> Path:
        """``attacks/round-<r>-client-<id>-<attack>.png``: originals above
        reconstructions."""
        from matplotlib.image import imsave

        folder = self.recorder.run_dir / ATTACKS_DIR
        folder.mkdir(exist_ok=True)
        path = folder / f"round-{server_round}-client-{pid}-{attack}.png"
        grid = image_grid([originals[:GRID_COLUMNS], rec[:GRID_COLUMNS]])
        imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)
        return path
