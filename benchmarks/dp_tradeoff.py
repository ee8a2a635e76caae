"""Accuracy vs epsilon, and the cost of DP per round, on one experiment.

Runs the experiment through the ``fedsim`` CLI once without privacy
(``privacy.mechanism = "none"``) and once per target epsilon (noise calibrated
for the whole run), then prints a Markdown table: final server accuracy, the
epsilon actually spent (largest client epsilon for DP-SGD, the server's for
DP-FedAvg), and seconds per round (the server's wait for the training replies
and the mean client training time, both without round 1, which warms up Ray's
actors).

Usage::

    python benchmarks/dp_tradeoff.py experiments/dp_sgd_fedavg.toml --epsilons 1 3 8
    python benchmarks/dp_tradeoff.py experiments/dp_fedavg.toml --epsilons 2 8 32

``--write-docs`` also writes the table into ``docs/methods/differential-privacy.md``,
the block of the experiment (:data:`BLOCKS`; only without ``--set``: the page
shows the experiments as shipped).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from cli_run import fedsim_run
from pages import check_block, write_block

#: experiment file stem -> its results block in docs/methods/differential-privacy.md
BLOCKS = {"dp_sgd_fedavg": "dp-tradeoff-dp-sgd", "dp_sgd_flora": "dp-tradeoff-flora"}


@dataclass(frozen=True)
class Outcome:
    """What one run measured."""

    label: str
    status: str
    rounds: int
    accuracy: float
    epsilon: float
    round_seconds: float
    client_seconds: float
    wall_seconds: float


def run(experiment: Path, overrides: list[str], out: Path) -> Path:
    """One CLI run; returns its run directory."""
    proc, run_dir = fedsim_run(experiment, overrides, out)
    if proc.returncode != 0:
        raise RuntimeError(f"fedsim run failed ({proc.returncode}):\n{proc.stderr}")
    return run_dir


def measure(label: str, run_dir: Path) -> Outcome:
    """Read accuracy, epsilon and timings from a run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    train = frame[frame["phase"] == "train"]
    later = train[train["round"] > 1]
    aggregated = later[later["client"].isna()]
    per_client = later[later["client"].notna()]
    last = train[train["client"].isna() & (train["round"] == train["round"].max())]
    values = last.set_index("metric")["value"]
    epsilon = float(values.get("epsilon-max", values.get("epsilon", float("nan"))))
    if "epsilon" not in values and "epsilon-max" not in values:
        epsilon = float("inf")
    return Outcome(
        label=label,
        status=str(summary["status"]),
        rounds=int(summary["rounds_completed"]),
        accuracy=float(summary["final"].get("accuracy", float("nan"))),
        epsilon=epsilon,
        round_seconds=float(
            aggregated[aggregated["metric"] == "seconds"]["value"].mean()
        ),
        client_seconds=float(
            per_client[per_client["metric"] == "seconds"]["value"].mean()
        ),
        wall_seconds=float(summary["wall_seconds"]),
    )


def table(outcomes: list[Outcome]) -> str:
    """Markdown table of the outcomes."""
    lines = [
        "| run | status | rounds | accuracy | epsilon | s/round (server wait) "
        "| s/client/round | wall s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        eps = "∞ (no DP)" if o.epsilon == float("inf") else f"{o.epsilon:.3f}"
        lines.append(
            f"| {o.label} | {o.status} | {o.rounds} | {o.accuracy:.4f} | {eps} "
            f"| {o.round_seconds:.2f} | {o.client_seconds:.2f} | {o.wall_seconds:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override applied to every run",
    )
    parser.add_argument("--json", type=Path, help="also write the outcomes as JSON")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into its docs page",
    )
    args = parser.parse_args(argv)
    block = BLOCKS.get(args.experiment.stem)
    if args.write_docs and (block is None or args.overrides):
        parser.error(
            f"--write-docs: the docs show {sorted(BLOCKS)} as shipped (no --set)"
        )
    if args.write_docs:
        check_block("methods/differential-privacy.md", block)

    # without DP the budget key must be back at its default: a mechanism that
    # does not read it refuses it (the file sets it for its DP runs)
    settings = [("no DP", ["privacy.mechanism=none", "privacy.target-epsilon=0"])]
    settings += [
        (
            f"target ε={eps:g}",
            [f"privacy.target-epsilon={eps}", "privacy.noise-multiplier=0"],
        )
        for eps in args.epsilons
    ]
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, overrides) in enumerate(settings):
            run_dir = run(
                args.experiment, [*args.overrides, *overrides], Path(tmp) / str(i)
            )
            outcomes.append(measure(label, run_dir))
            print(f"done: {label}", file=sys.stderr, flush=True)
    print(f"experiment: {args.experiment} {' '.join(args.overrides)}")
    print(table(outcomes))
    if args.write_docs:
        page = "methods/differential-privacy.md"
        print(f"wrote {write_block(page, block, table(outcomes))}")
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
