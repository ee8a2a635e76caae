"""The capacity-heterogeneity table of the README: HeteroFL, Pa3dFL and
FedProphet on one capacity mix, against FedAvg at full size (plain and with
end-to-end PGD training).

Usage::

    python benchmarks/capacity_table.py [--out DIR] [--set KEY=VALUE ...]
    python benchmarks/capacity_table.py --read RUN_DIR ...

Runs every experiment with ``fedsim run`` as a user would, one after the
other, and prints a Markdown table of the last round of each: clean and PGD
robust accuracy of the clients' evaluation (example-weighted mean, worst
client, mean of the smallest-capacity clients: those given the smallest entry
of ``strategy.capacities`` / ``strategy.memory-mb``; every client for FedAvg),
bytes per round (up + down, all clients, both phases), and the training
memory of a client (the largest ``memory-mb`` any client, and any of the
smallest-capacity clients, reported; for FedAvg, the full model counted as
HeteroFL and Pa3dFL count).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import numpy as np
from cli_run import markdown, run, table_parser

from fedsim import analysis
from fedsim.core.loading import load_experiment
from fedsim.learn.base import build_model
from fedsim.learn.capacity import training_memory_bytes
from fedsim.learn.data import federated_data

ROOT = Path(__file__).resolve().parents[1]
#: (experiment, overrides): the three families and the two FedAvg baselines.
RUNS = (
    ("experiments/heterofl_digits.toml", ()),
    ("experiments/pa3dfl_digits.toml", ()),
    ("experiments/fedprophet_digits.toml", ()),
    (
        "experiments/heterofl_digits.toml",
        ("strategy.name=fedavg", "name=fedavg-digits-full"),
    ),
    (
        "experiments/fedprophet_digits.toml",
        ("strategy.memory-mb=[1.0]", "name=fedavg-pgd-digits-full"),
    ),
)


def smallest(config: dict, clients: int) -> list[int]:
    """Partition ids given the smallest capacity entry (all without one)."""
    strategy = config.get("strategy", {})
    entries = strategy.get("capacities") or strategy.get("memory-mb")
    if not entries:
        return list(range(clients))
    low = int(np.argmin(entries))
    return [p for p in range(clients) if p % len(entries) == low]


def full_memory_mb(run_dir: Path) -> float:
    """Training memory of the run's full model, counted as the families do."""
    exp = load_experiment(run_dir / "config.toml", [])
    info = federated_data(exp.data, exp.federation.clients, exp.seed).info
    model = build_model(exp.model, info, exp.seed)
    slots = int(exp.train.momentum > 0)
    memory = training_memory_bytes(
        model, info.input_shape, exp.train.batch_size, optimizer_slots=slots
    )
    return memory / 1e6


def row(run_dir: Path) -> dict[str, str]:
    """One table row from a run directory."""
    frame = analysis.load_runs([run_dir])
    config = tomllib.loads((run_dir / "config.toml").read_text())
    last = int(frame["round"].max())
    low = smallest(config, int(config["federation"]["clients"]))
    out = {
        "experiment": f"`{frame['name'].iloc[0]}`",
        "strategy": str(frame["strategy"].iloc[0]),
        "rounds": str(last),
    }
    for metric, label in (("accuracy", "clean"), ("robust-accuracy", "robust")):
        clients = analysis.client_metric(frame, metric, "evaluate")
        final = clients[clients["round"] == last].set_index("client")["value"]
        mean = analysis.round_metric(frame, metric, "evaluate").iloc[-1, -1]
        out[f"{label} mean"] = f"{mean:.4f}"
        out[f"{label} worst"] = f"{final.min():.4f}"
        out[f"{label} smallest"] = f"{final[final.index.isin(low)].mean():.4f}"
    comm = analysis.communication(frame)
    comm = comm[comm["round"] >= 1]
    out["MB / round"] = f"{(comm['bytes_up'] + comm['bytes_down']).mean() / 1e6:.3f}"
    memory = frame[(frame["metric"] == "memory-mb") & frame["client"].notna()]
    if len(memory):
        peak = float(memory["value"].max())
        small = float(memory[memory["client"].isin(low)]["value"].max())
    else:
        peak = small = full_memory_mb(run_dir)
    out["peak client MB"] = f"{peak:.3f}"
    out["smallest client MB"] = f"{small:.3f}"
    return out


def main() -> int:
    parser = table_parser(__doc__, "runs/capacity-table")
    args = parser.parse_args()
    if args.read:
        dirs = list(args.read)
    else:
        dirs = []
        for name, overrides in RUNS:
            run_dir = run(ROOT / name, [*overrides, *args.overrides], args.out)
            dirs.append(run_dir)
            print(run_dir, file=sys.stderr, flush=True)
    print(markdown([row(d) for d in dirs], ("experiment", "strategy")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
