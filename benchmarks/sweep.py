"""Measure a sweep against separate runs and against the raw loop.

Usage::

    python benchmarks/sweep.py [--seeds 6] [--rounds 10]

The quickstart workload (digits, 10 clients, Dirichlet 0.5, CNN, 2 local epochs,
batch 16) over ``--seeds`` seeds, ``--rounds`` rounds each, run three ways on
this machine, one after another:

1. ``fedsim run`` once per seed (every run pays the whole start-up);
2. ``fedsim sweep`` over a ``[grid]`` of the seeds (start-up paid once);
3. the raw single-process loop: the same partitions, model, local training
   (``fedsim.learn.training.local_fit``), example-weighted FedAvg, federated and
   server-side evaluation, in plain Python, no Flower, no Ray.

Prints the wall times, their ratios, the sweep's seconds per experiment after
the first (each experiment's ServerApp wall time) against the raw loop's
seconds per seed, and whether every swept experiment's metrics equal its
separate run's (timings aside).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cli_run import fedsim_run
from flwr.app import RecordDict

from fedsim import privacy
from fedsim.core.loading import load_experiment
from fedsim.learn.base import build_model
from fedsim.learn.data import federated_data
from fedsim.learn.training import evaluate, local_fit

TIMING = ("seconds", "elapsed")


def untimed(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    frame = frame[~frame["metric"].isin(TIMING)]
    keys = ["round", "client", "phase", "metric"]
    return frame.sort_values(keys).reset_index(drop=True)


def raw_loop(seed: int, rounds: int) -> float:
    """The same work in one process; returns its seconds."""
    torch.set_num_threads(1)
    exp = load_experiment(None, [f"seed={seed}", f"rounds={rounds}"])
    start = time.perf_counter()
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    model = build_model(exp.model, data.info, exp.seed)
    mechanism = privacy.client_mechanism(exp)
    clients = [data.client(pid) for pid in range(exp.federation.clients)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, data.test, device=torch.device("cpu"))
    for rnd in range(1, rounds + 1):
        updates, weights = [], []
        for client in clients:
            model.load_state_dict(state)
            local_fit(
                model,
                client.train,
                exp,
                seed=rnd * 1000 + client.partition_id,
                device=torch.device("cpu"),
                state=RecordDict(),
                mechanism=mechanism,
            )
            updates.append(
                {k: v.detach().clone() for k, v in model.state_dict().items()}
            )
            weights.append(len(client.train))
        total = float(sum(weights))
        state = {
            k: sum(w / total * u[k].double() for w, u in zip(weights, updates)).to(
                state[k].dtype
            )
            for k in state
        }
        model.load_state_dict(state)
        for client in clients:
            evaluate(model, client.test, device=torch.device("cpu"))
        evaluate(model, data.test, device=torch.device("cpu"))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        separate: dict[int, Path] = {}
        start = time.perf_counter()
        for seed in seeds:
            proc, run_dir = fedsim_run(
                None, [f"seed={seed}", f"rounds={args.rounds}"], root / "separate"
            )
            if proc.returncode != 0:
                raise RuntimeError(proc.stdout + proc.stderr)
            separate[seed] = run_dir
        separate_s = time.perf_counter() - start

        quickstart = Path(__file__).resolve().parent.parent / "fedsim/quickstart.toml"
        sweep_file = root / "seeds.toml"
        sweep_file.write_text(
            quickstart.read_text() + f"\n[grid]\nseed = {json.dumps(seeds)}\n"
        )
        start = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedsim",
                "sweep",
                str(sweep_file),
                "--set",
                f"rounds={args.rounds}",
                "--out",
                str(root / "sweep"),
            ],
            capture_output=True,
            text=True,
        )
        sweep_s = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout + proc.stderr)
        sweep_dir = root / "sweep" / "seeds"
        index = json.loads((sweep_dir / "sweep.json").read_text())
        walls, equal = [], True
        for entry, seed in zip(index["experiments"], seeds):
            run_dir = sweep_dir / entry["run_dir"]
            summary = json.loads((run_dir / "summary.json").read_text())
            walls.append(summary["wall_seconds"])
            equal &= untimed(run_dir).equals(untimed(separate[seed]))
    raw = [raw_loop(seed, args.rounds) for seed in seeds]
    later = float(np.mean(walls[1:])) if len(walls) > 1 else float("nan")
    report = {
        "seeds": args.seeds,
        "rounds": args.rounds,
        "separate_runs_seconds": round(separate_s, 1),
        "sweep_seconds": round(sweep_s, 1),
        "sweep_over_separate": round(sweep_s / separate_s, 3),
        "sweep_experiment_seconds": [round(w, 2) for w in walls],
        "raw_loop_seconds_per_seed": round(float(np.mean(raw)), 2),
        "later_experiments_over_raw": round(later / float(np.mean(raw)), 2),
        "metrics_equal_to_separate_runs": bool(equal),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
