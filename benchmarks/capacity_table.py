"""The capacity-heterogeneity table of the docs: HeteroFL (as the reference
code runs it, and without its scaler and masking), Pa3dFL and FedProphet on one
capacity mix, against FedAvg at full size (plain and with end-to-end PGD
training), over 3 seeds, with each paper's claim beside its row.

Usage::

    python benchmarks/capacity_table.py [--out DIR] [--set KEY=VALUE ...]
    python benchmarks/capacity_table.py --read SWEEP_DIR
    python benchmarks/capacity_table.py --write-docs   # also into the docs page

Runs ``experiments/capacity_seeds.toml`` with ``fedsim sweep`` (one Flower run,
the 18 experiments one after another), then prints a Markdown table, one row
per variant, each cell the mean ± standard deviation over the seeds of the
last round: clean and PGD robust accuracy of the clients' evaluation
(example-weighted mean over clients, and the mean of the smallest-capacity
clients: those given the smallest entry of ``strategy.capacities`` /
``strategy.memory-mb``; every client for FedAvg), the global model's accuracy on
the held-out test set (families with a global model; HeteroFL also at width
0.25: ``accuracy-w0.25``), bytes per round (up + down, all clients, both
phases) and the counted training memory of the smallest-capacity clients. A
second table puts each paper's claim beside the measurement: "reproduced" or
"not reproduced" only where the mean ± std intervals separate (or, for a claim
of parity, overlap), otherwise "inconclusive".
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cli_run import markdown, table_parser
from pages import write_block

from fedsim import analysis
from fedsim.core.loading import load_experiment
from fedsim.learn.base import build_model
from fedsim.learn.capacity import training_memory_bytes
from fedsim.learn.data import federated_data

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "capacity_seeds.toml"
#: The page and block the tables are written into (``--write-docs``).
PAGE, BLOCK = "methods/capacity.md", "capacity"


def variant(settings: dict) -> str:
    """A row's name: the experiment's settings without the seed."""
    name = str(settings["strategy.name"])
    if name == "heterofl":
        return "heterofl" if settings.get("strategy.mask", True) else "heterofl-plain"
    if name == "fedprophet" and list(settings.get("strategy.memory-mb", [])) == [1.0]:
        return "fedavg-pgd"
    return name


def smallest(config: dict, clients: int) -> list[int]:
    """Partition ids given the smallest capacity entry (all without one)."""
    strategy = config.get("strategy", {})
    entries = strategy.get("capacities") or strategy.get("memory-mb")
    if not entries or strategy.get("name") == "fedavg":
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


def measure(run_dir: Path) -> dict[str, float]:
    """The last round's numbers of one run."""
    frame = analysis.load_runs([run_dir])
    config = tomllib.loads((run_dir / "config.toml").read_text())
    last = int(frame["round"].max())
    low = smallest(config, int(config["federation"]["clients"]))
    out: dict[str, float] = {}
    for metric, label in (("accuracy", "clean"), ("robust-accuracy", "robust")):
        clients = analysis.client_metric(frame, metric, "evaluate")
        final = clients[clients["round"] == last].set_index("client")["value"]
        out[f"{label} mean"] = analysis.round_metric(frame, metric, "evaluate").iloc[
            -1, -1
        ]
        out[f"{label} smallest"] = final[final.index.isin(low)].mean()
    server = frame[(frame["phase"] == "server") & (frame["round"] == last)]
    for metric, label in (("accuracy", "global"), ("accuracy-w0.25", "global w0.25")):
        values = server[server["metric"] == metric]["value"]
        out[label] = float(values.iloc[0]) if len(values) else float("nan")
    comm = analysis.communication(frame)
    comm = comm[comm["round"] >= 1]
    out["MB / round"] = (comm["bytes_up"] + comm["bytes_down"]).mean() / 1e6
    memory = frame[(frame["metric"] == "memory-mb") & frame["client"].notna()]
    if len(memory):
        out["smallest client MB"] = float(
            memory[memory["client"].isin(low)]["value"].max()
        )
    else:
        out["smallest client MB"] = full_memory_mb(run_dir)
    return out


def cell(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds (``-`` where the metric does not exist)."""
    v = np.asarray(values, dtype=float)
    if np.isnan(v).all():
        return "-"
    return f"{np.nanmean(v):.{digits}f} ± {np.nanstd(v, ddof=1):.{digits}f}"


Stats = dict[str, dict[str, list[float]]]


def interval(stats: Stats, row: str, column: str) -> tuple[float, float]:
    v = np.asarray(stats[row][column], dtype=float)
    mean, std = float(np.mean(v)), float(np.std(v, ddof=1))
    return mean - std, mean + std


def better(stats: Stats, a: str, b: str, column: str) -> str:
    """Claim "a > b": reproduced / not reproduced where the intervals
    separate, inconclusive where they overlap."""
    lo_a, hi_a = interval(stats, a, column)
    lo_b, hi_b = interval(stats, b, column)
    if lo_a > hi_b:
        return "reproduced"
    if hi_a < lo_b:
        return "not reproduced"
    return "inconclusive (intervals overlap)"


def parity(stats: Stats, a: str, b: str, column: str) -> str:
    """Claim "a ~ b": reproduced where the intervals overlap, not reproduced
    (and which is higher) where they separate."""
    lo_a, hi_a = interval(stats, a, column)
    lo_b, hi_b = interval(stats, b, column)
    if hi_a < lo_b:
        return f"not reproduced ({a} lower)"
    if lo_a > hi_b:
        return f"reproduced ({a} higher)"
    return "reproduced (intervals overlap)"


#: (row, claim, the check behind the verdict).
CLAIMS: tuple[tuple[str, str, Callable[[Stats], str]], ...] = (
    (
        "pa3dfl",
        "Pa3dFL: higher local accuracy than HeteroFL (CIFAR10 86.4 vs 68.4)",
        lambda s: better(s, "pa3dfl", "heterofl", "clean mean"),
    ),
    (
        "pa3dfl",
        "Pa3dFL: helps low-capacity clients most (smallest clients vs HeteroFL)",
        lambda s: better(s, "pa3dfl", "heterofl", "clean smallest"),
    ),
    (
        "pa3dfl",
        "Pa3dFL: higher local accuracy than HeteroFL without the reference's "
        "label-split masking (nothing masked at test time)",
        lambda s: better(s, "pa3dfl", "heterofl-plain", "clean mean"),
    ),
    (
        "heterofl",
        "HeteroFL: mixed widths keep the global model near full-size FedAvg",
        lambda s: parity(s, "heterofl", "fedavg", "global"),
    ),
    (
        "heterofl",
        "HeteroFL reference tricks (scaler, masking) help on non-IID data",
        lambda s: better(s, "heterofl", "heterofl-plain", "global"),
    ),
    (
        "fedprophet",
        "FedProphet: robust accuracy on par with end-to-end PGD FedAvg",
        lambda s: parity(s, "fedprophet", "fedavg-pgd", "robust mean"),
    ),
    (
        "fedprophet",
        "FedProphet: clean accuracy on par with end-to-end PGD FedAvg",
        lambda s: parity(s, "fedprophet", "fedavg-pgd", "clean mean"),
    ),
    (
        "fedprophet",
        "FedProphet: less training memory than end-to-end PGD FedAvg",
        lambda s: better(s, "fedavg-pgd", "fedprophet", "smallest client MB"),
    ),
)
ORDER = ("heterofl", "heterofl-plain", "pa3dfl", "fedprophet", "fedavg", "fedavg-pgd")


def tables(sweep_dir: Path) -> str:
    """The results table and the claims table of a finished sweep."""
    experiments = json.loads((sweep_dir / "sweep.json").read_text())["experiments"]
    stats: Stats = {}
    for entry in experiments:
        summary = sweep_dir / entry["run_dir"] / "summary.json"
        if not summary.exists():
            continue
        if json.loads(summary.read_text())["status"] != "completed":
            continue
        row = stats.setdefault(variant(entry["settings"]), {})
        for key, value in measure(sweep_dir / entry["run_dir"]).items():
            row.setdefault(key, []).append(value)
    seeds = {k: len(v["clean mean"]) for k, v in stats.items()}
    rows = []
    for name in [n for n in ORDER if n in stats]:
        out = {"variant": f"`{name}`", "seeds": str(seeds[name])}
        for column, values in stats[name].items():
            out[column] = cell(values, 2 if "MB" in column else 3)
        rows.append(out)
    claims = []
    for row, claim, check in CLAIMS:
        try:
            verdict = check(stats)
        except KeyError:  # a compared variant did not complete
            verdict = "not measured"
        claims.append({"row": f"`{row}`", "paper's claim": claim, "here": verdict})
    return (
        markdown(rows, ("variant",))
        + "\n\n"
        + markdown(claims, ("row", "paper's claim", "here"))
    )


def main() -> int:
    parser = table_parser(__doc__, "runs/capacity-table")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"also write the tables into docs/{PAGE} (block {BLOCK!r})",
    )
    args = parser.parse_args()
    if args.read:
        (sweep_dir,) = args.read
    else:
        command = [sys.executable, "-m", "fedsim", "sweep", str(SWEEP)]
        command += [a for pair in args.overrides for a in ("--set", pair)]
        subprocess.run([*command, "--out", str(args.out)], check=True)
        sweep_dir = args.out / SWEEP.stem
    text = tables(sweep_dir)
    print(text)
    if args.write_docs:
        write_block(PAGE, BLOCK, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
