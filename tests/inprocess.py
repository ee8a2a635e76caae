"""Whole runs in-process: the real ServerApp ``run`` (build, privacy and recording
wrappers, round driver, checkpoints) on a grid that hands each message to the
real ClientApp handler with a per-node ``Context``, as Flower's simulation
runtime does, without Ray (tests/test_resume.py, tests/test_conformance.py,
tests/test_reference.py)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import Context, Message, RecordDict

from fedsim import privacy
from fedsim.core.messages import PARTITION_ID
from fedsim.core.rundir import read_metrics
from fedsim.engine.client import client_app
from fedsim.engine.host.local_simulation import run_config_of
from fedsim.engine.server import server_app
from tests.conftest import ScriptedGrid

#: Metrics that measure time, not the computation.
TIMING = ("seconds", "elapsed")


class ClientAppGrid(ScriptedGrid):
    """Answers each message with the real ClientApp handler; one ``Context`` per
    node, kept across rounds as Flower's simulation runtime keeps it."""

    def __init__(self, num_clients: int, run_config: dict):
        super().__init__({100 + pid: pid for pid in range(num_clients)})
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={PARTITION_ID: pid, "num-partitions": num_clients},
                state=RecordDict(),
                run_config=run_config,
            )
            for node, pid in self.partitions.items()
        }

    def answer(self, msg: Message, message_id: str) -> Message:
        msg.metadata._message_id = message_id  # noqa: SLF001 (as received)
        if msg.metadata.message_type == "query":
            return super().answer(msg, message_id)
        node = msg.metadata.dst_node_id
        reply = client_app._handle(msg, self.contexts[node])  # noqa: SLF001
        reply.metadata._src_node_id = node  # noqa: SLF001
        return reply


def new_process() -> None:
    """What a new simulation process starts with: no cached client runtime or
    mechanism, global generators in some unrelated state."""
    client_app._runtime.cache_clear()  # noqa: SLF001
    privacy.client_mechanism.cache_clear()
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


def simulate(
    exp: Any, run_dir: Path, *, resume: bool = False, crash: int | None = None
) -> None:
    """The ServerApp's ``main`` for one run, in-process (``crash``: the round
    whose end the process does not survive)."""
    new_process()
    grid = ClientAppGrid(
        exp.federation.clients, run_config_of(exp, run_dir, resume=resume)
    )
    recorder = server_app.recorder_for(exp, run_dir)
    if crash is not None:
        os.environ[server_app.CRASH_IN_ROUND] = str(crash)
    try:
        with recorder.recording():
            server_app.run(grid, exp, recorder, resume=resume)
    finally:
        os.environ.pop(server_app.CRASH_IN_ROUND, None)


def comparable(run_dir: Path) -> pd.DataFrame:
    """A run's metrics without the timing rows, in a fixed order."""
    frame = read_metrics(run_dir)
    assert frame is not None
    frame = frame[~frame["metric"].isin(TIMING)]
    return frame.sort_values(["round", "phase", "client", "metric"]).reset_index(
        drop=True
    )
