"""The LoRA results table of docs/lora.md: FLoRA, FedIT and full-model FedAvg
fine-tuning of one pre-trained base, homogeneous and heterogeneous ranks.

Usage::

    python benchmarks/lora_table.py [--out DIR] [--set KEY=VALUE ...] [EXPERIMENT ...]

Builds the shared pre-trained base once (cached, so no run's wall time includes
pre-training), then runs every experiment with ``fedsim run`` as a user would,
one after the other, and prints a Markdown table: accuracy of the base (round 0),
of the final global model, and its mean over rounds 1..R (how fast it learns) on
the held-out test set, the mean of the
``aggregation-error`` over rounds, bytes down and up summed over all clients,
rounds and phases (train and federated evaluation), and the run's wall time (the
ServerApp's, without the simulation runtime's start-up). ``--set`` applies to
every experiment (e.g. ``--set rounds=3`` for a quick check). Run directories go
to ``DIR`` (default ``runs/lora-table``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from cli_run import markdown, run

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = (
    "experiments/flora_r8.toml",
    "experiments/fedit_r8.toml",
    "experiments/flora_hetero.toml",
    "experiments/fedit_hetero.toml",
    "experiments/fedavg_finetune.toml",
)


def warm_cache(experiment: Path, overrides: list[str]) -> None:
    """Build (or load) the experiment's pre-trained base in this process."""
    from fedsim.core.loading import load_experiment
    from fedsim.learn.base import build_model
    from fedsim.learn.data import federated_data

    exp = load_experiment(experiment, overrides)
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    build_model(exp.model, data.info, exp.seed)


def row(run_dir: Path) -> dict[str, str]:
    """One table row from a run directory."""
    from fedsim.core.loading import load_experiment

    exp = load_experiment(run_dir / "config.toml")
    summary = json.loads((run_dir / "summary.json").read_text())
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    agg = frame[frame["client"].isna()]
    server = agg[(agg["phase"] == "server") & (agg["metric"] == "accuracy")]
    server = server.set_index("round")["value"]
    error = agg[agg["metric"] == "aggregation-error"]["value"]
    down = agg[agg["metric"] == "bytes-down"]["value"].sum()
    up = agg[agg["metric"] == "bytes-up"]["value"].sum()
    if exp.peft.method == "lora":
        ranks = (
            ", ".join(map(str, exp.peft.ranks))
            if exp.peft.ranks
            else str(exp.peft.rank)
        )
    else:
        ranks = "full model"
    return {
        "experiment": f"`{exp.name}`",
        "strategy": exp.strategy.name,
        "ranks": ranks,
        "base accuracy": f"{server.loc[0]:.4f}",
        "final accuracy": f"{server.iloc[-1]:.4f}",
        "mean accuracy": f"{server.loc[1:].mean():.4f}",
        "aggregation error": f"{error.mean():.2e}" if len(error) else "-",
        "MB down": f"{down / 1e6:.2f}",
        "MB up": f"{up / 1e6:.2f}",
        "MB total": f"{(down + up) / 1e6:.2f}",
        "wall s": f"{summary['wall_seconds']:.1f}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", default=list(EXPERIMENTS))
    parser.add_argument("--out", type=Path, default=Path("runs/lora-table"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rows = []
    for name in args.experiments:
        experiment = Path(name) if Path(name).exists() else ROOT / name
        warm_cache(experiment, args.overrides)
        run_dir = run(experiment, args.overrides, args.out)
        rows.append(row(run_dir))
        print(f"{run_dir}: {rows[-1]['final accuracy']}", file=sys.stderr, flush=True)
    print(markdown(rows, ("experiment", "strategy", "ranks")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
