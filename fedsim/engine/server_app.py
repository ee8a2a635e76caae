"""The Flower ServerApp: builds the strategy from config and drives the rounds.

Rounds run through :class:`fedsim.grid.RecordingGrid`, which records per-client
metrics and bytes; server-side evaluation of the global model on the held-out test
set closes each round and makes the recorder write the run directory.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedsim.core import registry
from fedsim.core.config import RUN_DIR_KEY, Experiment, from_run_config
from fedsim.learn.data import federated_data
from fedsim.learn.models import build_model
from fedsim.privacy.mechanisms import wrap_strategy
from fedsim.engine.recorder import RunRecorder, create_run_dir
from fedsim.engine.recording import RecordingGrid, RecordingStrategy
from fedsim.analysis.trackers import build_sinks
from fedsim.learn.training import evaluate, resolve_device

app = ServerApp()


def run_dir_for(run_config: dict, exp: Experiment) -> Path:
    """The CLI passes a run directory; a bare ``flwr run`` gets ./runs/<name>-<ts>."""
    given = str(run_config.get(RUN_DIR_KEY, ""))
    return Path(given) if given else create_run_dir(Path("runs").resolve(), exp)


def run(grid: Grid, exp: Experiment, recorder: RunRecorder) -> None:
    """Run all rounds of ``exp`` on ``grid``; rows go to ``recorder``."""
    random.seed(exp.seed)
    np.random.seed(exp.seed % 2**32)
    torch.set_num_threads(1)
    device = resolve_device(exp.resources)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    model = build_model(exp.model, data.info, exp.seed).to(device)
    initial = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
    strategy = wrap_strategy(registry.STRATEGIES[exp.strategy.name].load()(exp), exp)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        stats = evaluate(model, data.test, device=device)
        metrics: dict[str, Any] = {"loss": stats.loss, "accuracy": stats.accuracy}
        recorder.server(server_round, metrics)
        recorder.checkpoint(server_round, {k: a.numpy() for k, a in arrays.items()})
        recorder.end_round(server_round)
        return MetricRecord(metrics)

    RecordingStrategy(strategy, recorder, seed=exp.seed).start(
        grid=RecordingGrid(
            grid,
            recorder,
            num_clients=exp.federation.clients,
            min_replies=exp.federation.min_replies,
        ),
        initial_arrays=initial,
        num_rounds=exp.rounds,
        timeout=exp.federation.round_timeout,
        evaluate_fn=evaluate_global,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls with the run's Grid and Context."""
    exp = from_run_config(context.run_config)
    run_dir = run_dir_for(dict(context.run_config), exp)
    recorder = RunRecorder(run_dir, exp, sinks=build_sinks(exp, run_dir))
    with recorder.recording():
        run(grid, exp, recorder)
