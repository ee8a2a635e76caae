"""How the capacity comparison changes with a longer run: HeteroFL (as the
reference runs it, and without its scaler and masking) and Pa3dFL on the
capacity table's federation, without the robust evaluation, for
``--rounds`` rounds (default 30, twice the table's), over seeds.

Usage::

    python benchmarks/capacity_rounds.py [--out DIR] [--seeds 0,1,2]
                                         [--rounds 30] [--write-docs]

One ``fedsim sweep`` of ``experiments/pa3dfl_digits.toml`` (the federation,
data, model and training of ``experiments/capacity_seeds.toml``) with
``robust.epsilon = 0``. Prints, mean ± std over seeds, the clients' local
accuracy (example-weighted mean; and the mean over the smallest-capacity
clients) at round 15 and at the last round, and which pairs' intervals
separate at the last round. ``--write-docs`` writes it into
``docs/methods/capacity.md`` (block ``capacity-rounds``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli_run import markdown
from pages import write_block
from seeds import ROOT, mean_std, seeds_argument, separated, sweep_runs

from fedsim import analysis

BASE = ROOT / "experiments/pa3dfl_digits.toml"
VARIANTS = (
    {"name": "heterofl", "strategy.name": "heterofl"},
    {
        "name": "heterofl-plain",
        "strategy.name": "heterofl",
        "strategy.scaler": False,
        "strategy.mask": False,
    },
    {"name": "pa3dfl", "strategy.name": "pa3dfl"},
)
PAIRS = (("pa3dfl", "heterofl"), ("pa3dfl", "heterofl-plain"))
#: The capacity table's length (its rounds): the earlier column.
TABLE_ROUNDS = 15


def measure(run_dir: Path, smallest: list[int]) -> dict[str, float]:
    """Local accuracy at round 15 and at the last round."""
    frame = analysis.load_runs([run_dir])
    headline = analysis.round_metric(frame, "accuracy", "evaluate").iloc[:, -1]
    clients = analysis.client_metric(frame, "accuracy", "evaluate")
    last = int(frame["round"].max())
    final = clients[clients["round"] == last].set_index("client")["value"]
    return {
        "at15": float(headline.loc[TABLE_ROUNDS]),
        "last": float(headline.iloc[-1]),
        "smallest": float(final[final.index.isin(smallest)].mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tables"))
    parser.add_argument("--seeds", type=seeds_argument, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into docs/methods/capacity.md",
    )
    args = parser.parse_args()
    if args.rounds <= TABLE_ROUNDS:
        parser.error(f"--rounds must exceed {TABLE_ROUNDS}")
    overrides = [f"rounds={args.rounds}", "robust.epsilon=0"]
    runs = sweep_runs(
        BASE,
        VARIANTS,
        args.seeds,
        args.out,
        name="capacity-rounds",
        overrides=overrides,
    )
    # capacities [1.0, 0.5, 0.25], entry i mod 3: the quarter-width clients
    smallest = [p for p in range(20) if p % 3 == 2]
    measured = {n: [measure(d, smallest) for d in dirs] for n, dirs in runs.items()}
    rows = [
        {
            "variant": f"`{name}`",
            "seeds": str(len(m)),
            f"clean mean, round {TABLE_ROUNDS}": mean_std([r["at15"] for r in m]),
            f"clean mean, round {args.rounds}": mean_std([r["last"] for r in m]),
            f"clean smallest, round {args.rounds}": mean_std(
                [r["smallest"] for r in m]
            ),
        }
        for name, m in measured.items()
    ]
    lines = [markdown(rows, ("variant",)), ""]
    for a, b in PAIRS:
        for key, label in (("last", "mean"), ("smallest", "smallest")):
            apart = separated(
                [r[key] for r in measured[a]], [r[key] for r in measured[b]]
            )
            verdict = "intervals separate" if apart else "intervals overlap"
            lines.append(f"- {a} vs {b}, round {args.rounds}, {label}: {verdict}")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_block("methods/capacity.md", "capacity-rounds", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
