"""The Flower ServerApp: builds once, hands the build to the family, drives rounds.

The engine builds the data, the model and the initial arrays once
(:class:`fedsim.protocol.setup.ServerSetup`), the family's server side builds its
strategy from them, privacy wraps it, recording wraps that
(:mod:`fedsim.engine.server.strategy_recording`), and
:class:`fedsim.engine.server.round_driver.RoundDriver` runs and closes every
round through :class:`fedsim.engine.server.exchange_recording.RecordingGrid`.

After every completed round the resume checkpoint is written
(:mod:`fedsim.engine.server.resume_checkpoint`); with ``resume`` in the run-config
(``fedsim run --resume``) the run continues from it: the strategies' state, the
global arrays, the random generators and the recorder are restored, the
clients' saved states of later rounds are dropped, and the rounds after the
checkpoint run.

Importing this module indexes Flower's in-memory LinkState by destination node
(:mod:`fedsim.flwr_private.linkstate`): in simulation the runtime shares this
process; and reads arrays without ``np.load``'s header parse
(:mod:`fedsim.flwr_private.arrays`).

``FEDSIM_TEST_CRASH_IN_ROUND=<r>`` in the ServerApp's environment (tests only)
makes round ``r`` fail once it has run, before anything of it is recorded.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedsim import privacy
from fedsim.analysis.trackers import build_sinks
from fedsim.audit.auditor import Auditor
from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.core.loading import (
    ASSIGN_KEY,
    RESUME_KEY,
    RUN_DIR_KEY,
    SWEEP_KEY,
    from_run_config,
)
from fedsim.engine.client.client_state import ClientStateStore
from fedsim.engine.server import resume_checkpoint
from fedsim.engine.server.exchange_recording import RecordingGrid
from fedsim.engine.server.round_driver import RoundDriver
from fedsim.engine.server.run_recorder import RunRecorder, create_run_dir, headline_of
from fedsim.engine.server.strategy_recording import RecordingStrategy
from fedsim.flwr_private import arrays, linkstate
from fedsim.learn.base import build_model
from fedsim.learn.device import resolve_device
from fedsim.learn.hf import export
from fedsim.learn.robust import robust_metrics
from fedsim.learn.tasks import task_data, task_for
from fedsim.protocol import contract
from fedsim.protocol.setup import ServerSetup

linkstate.install()
arrays.install()
app = ServerApp()

#: Environment variable (tests only): the round that crashes.
CRASH_IN_ROUND = "FEDSIM_TEST_CRASH_IN_ROUND"

#: The run directory's folder of the final global model
#: (:func:`fedsim.learn.hf.export`).
MODEL_DIR = "model"


def run_dir_for(run_config: dict, exp: Experiment) -> Path:
    """The CLI passes a run directory; a bare ``flwr run`` gets ./runs/<name>-<ts>."""
    given = str(run_config.get(RUN_DIR_KEY, ""))
    return Path(given) if given else create_run_dir(Path("runs").resolve(), exp)


def build(exp: Experiment) -> ServerSetup:
    """Data, model and initial arrays, built once for the whole run."""
    random.seed(exp.seed)
    np.random.seed(exp.seed % 2**32)
    torch.set_num_threads(1)
    device = resolve_device(exp.resources)
    data = task_data(exp)
    model = build_model(exp.model, data.info, exp.seed)
    model = registry.family(exp.strategy.name).adapt_model(model, exp).to(device)
    initial = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return ServerSetup(exp, data, model, initial, device)


def run(
    grid: Grid,
    exp: Experiment,
    recorder: RunRecorder,
    *,
    experiment: int | None = None,
    partitions: dict[int, int] | None = None,
    assign: bool = False,
    resume: bool = False,
) -> RecordingGrid:
    """Run all rounds of ``exp`` on ``grid``; rows go to ``recorder``.

    ``experiment`` and ``partitions``: a sweep's experiment index (stamped on
    every message) and the node -> partition map its earlier experiments found.
    ``assign``: the server assigns partitions to the (simulated) nodes instead
    of asking them (:class:`RecordingGrid`).
    ``resume``: continue from the run directory's resume checkpoint.
    Returns the recording grid (its ``partitions()`` serve the next experiment).
    """
    family = registry.family(exp.strategy.name)
    setup = build(exp)
    own = family.load_server()(setup)
    contract.check_server_state(family, own)
    strategy = RecordingStrategy(
        privacy.wrap_strategy(own, exp),
        recorder,
        seed=exp.seed,
    )
    run_dir = recorder.run_dir
    digest = resume_checkpoint.config_digest(run_dir)
    arrays = setup.initial if family.global_model else None
    start = 1
    if resume:
        if family.resume:
            raise ConfigError(f"--resume: strategy {family.name!r}: {family.resume}")
        saved = resume_checkpoint.check_resumable(run_dir)
        resume_checkpoint.restore_strategy(strategy, saved["strategy"])
        arrays = resume_checkpoint.arrays_record(saved["arrays"])
        recorder.resume(saved["round"], saved["recorder"])
        ClientStateStore(run_dir).prune_after(saved["round"])
        resume_checkpoint.restore_rng(saved["rng"])
        start = saved["round"] + 1

    def save(server_round: int, arrays: ArrayRecord | None) -> Callable[[], None]:
        taken = {
            "round": server_round,
            "config": digest,
            "arrays": resume_checkpoint.arrays_state(arrays),
            "strategy": copy.deepcopy(resume_checkpoint.strategy_state(strategy)),
            "rng": resume_checkpoint.rng_state(),
        }

        def write() -> None:
            tree = {**taken, "recorder": recorder.resume_state()}
            resume_checkpoint.write_checkpoint(run_dir, tree)

        return write

    def evaluate_global(arrays: ArrayRecord) -> dict[str, float]:
        setup.model.load_state_dict(arrays.to_torch_state_dict())
        task = task_for(exp)
        stats = task.evaluate(setup.model, setup.data.test, device=setup.device)
        robust = robust_metrics(
            setup.model, setup.data.test, exp.robust, device=setup.device, seed=exp.seed
        )
        more = family.more_server_metrics(setup, arrays)
        return {**stats.values, **robust, **more}

    auditor = None
    if exp.audit.enabled:
        auditor = Auditor(exp, setup.data, recorder, family.audit)
    recording = RecordingGrid(
        grid,
        recorder,
        num_clients=exp.federation.clients,
        experiment=experiment,
        partitions=partitions,
        assign=assign,
        observer=auditor.observe if auditor else None,
    )
    crash = os.environ.get(CRASH_IN_ROUND)
    final = RoundDriver(
        strategy,
        recording,
        recorder,
        evaluate=evaluate_global if family.global_model else None,
        rounds=exp.rounds,
        timeout=exp.federation.round_timeout,
        min_replies=exp.federation.min_replies,
        resume_save=save,
        after_round=auditor.after_round if auditor else None,
        crash_in_round=int(crash) if crash else None,
    ).run(arrays, start=start)
    if final is not None:
        setup.model.load_state_dict(final.to_torch_state_dict())
        export(setup.model, run_dir / MODEL_DIR)
    return recording


def recorder_for(exp: Experiment, run_dir: Path) -> RunRecorder:
    """The run directory's recorder, with the trackers the experiment asks for."""
    return RunRecorder(
        run_dir,
        exp,
        sinks=build_sinks(exp, run_dir),
        headline=headline_of(exp),
        extra_summary=privacy.summary_fields(exp),
    )


def run_sweep(
    grid: Grid, entries: list[dict[str, Any]], *, assign: bool = False
) -> None:
    """The experiments of a sweep, one after another, on the same nodes.

    Each entry holds an experiment's run-config and run directory. A failed
    experiment is recorded as failed and the next one starts; an interrupt
    ends the sweep.
    """
    partitions: dict[int, int] | None = None
    for index, entry in enumerate(entries):
        exp = from_run_config(entry["config"])
        recorder = recorder_for(exp, Path(entry[RUN_DIR_KEY]))
        with suppress(Exception), recorder.recording():
            used = run(
                grid,
                exp,
                recorder,
                experiment=index,
                partitions=partitions,
                assign=assign,
            )
            partitions = used.partitions()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls with the run's Grid and Context."""
    assign = bool(context.run_config.get(ASSIGN_KEY, False))
    if SWEEP_KEY in context.run_config:
        entries = json.loads(str(context.run_config[SWEEP_KEY]))
        run_sweep(grid, entries, assign=assign)
        return
    exp = from_run_config(context.run_config)
    recorder = recorder_for(exp, run_dir_for(dict(context.run_config), exp))
    with recorder.recording():
        run(
            grid,
            exp,
            recorder,
            assign=assign,
            resume=bool(context.run_config.get(RESUME_KEY)),
        )
