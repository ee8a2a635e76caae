"""Split experiments in-process, one seed each: bytes per round, accuracy.

A quick look; the docs' seeded tables are ``sfprompt_table.py`` and
``amaq_table.py``.

Usage::

    python benchmarks/split_comm.py [--set KEY=VALUE ...] [EXP[:KEY=VALUE,...] ...]

Runs each experiment in this process through the real strategy, the real
client algorithm, the real
:class:`fedsim.engine.server.exchange_recording.RecordingGrid` (which
counts the bytes of every message exactly as in a Flower run) and the round
driver with the server-side evaluation, but without Flower's simulation
runtime: messages are answered at once by the client algorithm of their node
(``tests.test_split.InProcessGrid``, each node with its own ``context.state``).
Bytes and accuracy are those of ``fedsim run`` on the same experiment; seconds
are not (no 0.1 s message polling, no serialisation between processes).

Prints a Markdown table: final server accuracy, bytes up and down per round
(all clients, mean over rounds), their sum relative to the first experiment,
and the mean bit width of the activations sent in the last round (AMAQ).
``EXP:k=v,k=v`` overrides keys of one experiment; ``--set`` applies to all.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from cli_run import markdown

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.core import registry  # noqa: E402
from fedsim.core.loading import load_experiment  # noqa: E402
from fedsim.engine.server.exchange_recording import RecordingGrid  # noqa: E402
from fedsim.engine.server.round_driver import RoundDriver  # noqa: E402
from fedsim.engine.server.run_recorder import RunRecorder  # noqa: E402
from fedsim.engine.server.server_app import build  # noqa: E402
from fedsim.engine.server.strategy_recording import RecordingStrategy  # noqa: E402
from fedsim.learn.training import evaluate  # noqa: E402
from tests.test_split import InProcessGrid  # noqa: E402

DEFAULT = (
    "experiments/split_ushape_vit.toml",
    "experiments/sfprompt_vit.toml",
)


def run(path: str, overrides: list[str]) -> dict[str, str]:
    """One experiment in-process; its table row."""
    from fedsim.flwr_private import set_task_identity

    set_task_identity(1, 0, 1)
    file, _, extra = path.partition(":")
    sets = [*overrides, *(e for e in extra.split(",") if e)]
    exp = load_experiment(ROOT / file, sets)
    setup = build(exp)
    strategy = registry.family(exp.strategy.name).load_server()(setup)

    def evaluate_global(arrays):  # type: ignore[no-untyped-def]
        setup.model.load_state_dict(arrays.to_torch_state_dict())
        stats = evaluate(setup.model, setup.data.test, device=setup.device)
        return {"loss": stats.loss, "accuracy": stats.accuracy}

    with tempfile.TemporaryDirectory() as tmp:
        recorder = RunRecorder(Path(tmp), exp)
        partitions = {100 + i: i for i in range(exp.federation.clients)}
        fake = InProcessGrid(partitions, exp, setup.data)
        grid = RecordingGrid(
            fake, recorder, num_clients=exp.federation.clients
        )
        RoundDriver(
            RecordingStrategy(strategy, recorder, seed=exp.seed),
            grid,
            recorder,
            evaluate=evaluate_global,
            rounds=exp.rounds,
            timeout=60,
        ).run(setup.initial)
        rows = recorder.rows
    rounds = exp.rounds

    def total(metric: str) -> float:
        return sum(v for r, c, p, m, v in rows if c is None and m == metric and r >= 1)

    accuracy = [v for r, c, p, m, v in rows if m == "accuracy" and p == "server"]
    bits = [v for r, c, p, m, v in rows if c is None and m == "mean-bits"]
    return {
        "experiment": f"{exp.name} ({exp.strategy.name}"
        + (f", {extra}" if extra else "")
        + ")",
        "accuracy": f"{accuracy[-1]:.4f}",
        "up/round": f"{total('bytes-up') / rounds / 1e6:.3f} MB",
        "down/round": f"{total('bytes-down') / rounds / 1e6:.3f} MB",
        "total": f"{(total('bytes-up') + total('bytes-down')) / 1e6:.2f} MB",
        "bits": f"{bits[-1]:.2f}" if bits else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", default=list(DEFAULT))
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run(e, args.overrides) for e in args.experiments]
    base = float(rows[0]["total"].split()[0])
    for r in rows:
        r["vs first"] = f"{float(r['total'].split()[0]) / base:.2f}"
    print(markdown(rows, ("experiment",)))


if __name__ == "__main__":
    main()
