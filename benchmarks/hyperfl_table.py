"""The HyperFL table of the README: HyperFL, FedAvg and local-only training on
one label-skewed federation (and HyperFL-LPM on a pre-trained ViT).

Usage::

    python benchmarks/hyperfl_table.py [--out DIR] [--set KEY=VALUE ...] [EXP ...]
    python benchmarks/hyperfl_table.py --read RUN_DIR ...

Runs every experiment with ``fedsim run`` as a user would, one after the other,
reads the run directories with :mod:`fedsim.analysis` and prints a Markdown
table of the last round: personalised accuracy (each client on its own local
test split; the example-weighted mean and the worst client), bytes one client
sends up and gets down in a training exchange (the hypernetwork for HyperFL,
the whole model for FedAvg, nothing for local-only), bytes up and down per
round over all clients and both phases (training and evaluation), and seconds
per round (the ServerApp's elapsed time from the end of round 1 to the last,
divided by the rounds in between: the simulation runtime's start-up is left
out). ``--set`` applies to every experiment (``--set rounds=3`` for a quick
check). Run directories go to ``DIR`` (default ``runs/hyperfl-table``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cli_run import markdown, run, table_parser

from fedsim import analysis

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = (
    "experiments/hyperfl_digits.toml",
    "experiments/fedavg_digits_skew.toml",
    "experiments/local_digits_skew.toml",
    "experiments/hyperfl_lpm_vit.toml",
)


def row(run_dir: Path) -> dict[str, str]:
    """One table row from a run directory."""
    frame = analysis.load_runs([run_dir])
    last = int(frame["round"].max())
    clients = analysis.client_metric(frame, "accuracy", "evaluate")
    final = clients[clients["round"] == last]["value"]
    headline = analysis.round_metric(frame, "accuracy", "evaluate")
    rows = frame[frame["client"].notna() & (frame["phase"] == "train")]
    one_up = rows[(rows["metric"] == "bytes-up") & (rows["round"] == last)]["value"]
    one_down = rows[(rows["metric"] == "bytes-down") & (rows["round"] == last)]
    comm = analysis.communication(frame)
    comm = comm[comm["round"] >= 1]
    elapsed = frame[
        frame["client"].isna()
        & (frame["phase"] == "server")
        & (frame["metric"] == "elapsed")
    ].set_index("round")["value"]
    per_round = (elapsed.loc[last] - elapsed.loc[1]) / max(last - 1, 1)
    return {
        "experiment": f"`{frame['name'].iloc[0]}`",
        "strategy": str(frame["strategy"].iloc[0]),
        "rounds": str(last),
        "accuracy (mean)": f"{headline.iloc[-1, -1]:.4f}",
        "accuracy (worst client)": f"{final.min():.4f}",
        "up per client": analysis.human_bytes(one_up.mean()),
        "down per client": analysis.human_bytes(one_down["value"].mean()),
        "MB up / round": f"{comm['bytes_up'].mean() / 1e6:.2f}",
        "MB down / round": f"{comm['bytes_down'].mean() / 1e6:.2f}",
        "s / round": f"{per_round:.1f}",
    }


def main() -> int:
    parser = table_parser(__doc__, "runs/hyperfl-table")
    parser.add_argument("experiments", nargs="*", default=list(EXPERIMENTS))
    args = parser.parse_args()
    if args.read:
        dirs = list(args.read)
    else:
        dirs = []
        for name in args.experiments:
            experiment = Path(name) if Path(name).exists() else ROOT / name
            dirs.append(run(experiment, args.overrides, args.out))
            print(dirs[-1], file=sys.stderr, flush=True)
    print(markdown([row(d) for d in dirs], ("experiment", "strategy")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
