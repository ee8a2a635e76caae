"""The split-learning table of the docs: SplitFed V1 / V2, U-shaped (float and
int8 across the cut) and FedAvg on the same federation, model and data.

Usage::

    python benchmarks/split_table.py [--out DIR] [--set KEY=VALUE ...]
    python benchmarks/split_table.py --read RUN_DIR ...

``--write-docs`` also writes the table into ``docs/methods/split-learning.md``
(block ``split-compare``, :mod:`pages`).

Runs every experiment with ``fedsim run`` as a user would, one after the other
(FedAvg: ``experiments/sfl_v1_digits.toml`` with ``strategy.name=fedavg``),
reads the run directories with :mod:`fedsim.analysis` and prints a Markdown
table: server accuracy of the global model after the last round, MB up and down
per round over all clients, exchanges per round (the strategy's ``exchanges``;
FedAvg: 1), seconds per round (the ServerApp's elapsed time from the end of
round 1 to the last, divided by the rounds in between), seconds the server
waited per exchange and the clients' own compute per message (both from round 2
on: round 1 includes the clients' start-up) (their
``seconds``, summed, divided by the messages they answered: one per exchange
each, here every client is in every exchange of V1 and U-shaped; V2 addresses
one client per exchange). For V2 (one message in flight at a time) the
difference of the last two is what the runtime adds per exchange (Flower's
own simulation engine picked messages up every 0.1 s; fedsim's launcher wakes
it when a message is stored, see ``fedsim.flwr_private.vce``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli_run import markdown, run
from pages import check_block, write_block

from fedsim import analysis

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "experiments/sfl_v1_digits.toml"
RUNS: tuple[tuple[Path, tuple[str, ...]], ...] = (
    (V1, ("strategy.name=fedavg", "name=fedavg-digits-mlp")),
    (V1, ()),
    (ROOT / "experiments/sfl_v1_digits_int8.toml", ()),
    (ROOT / "experiments/sfl_v2_digits.toml", ()),
    (ROOT / "experiments/split_ushape_digits.toml", ()),
    (ROOT / "experiments/split_ushape_digits_int8.toml", ()),
)


def _rows(frame, phase: str, metric: str, *, clients: bool):  # type: ignore[no-untyped-def]
    mask = (frame["phase"] == phase) & (frame["metric"] == metric)
    mask &= frame["client"].notna() if clients else frame["client"].isna()
    return frame[mask & (frame["round"] >= 1)]


def row(run_dir: Path) -> dict[str, str]:
    """One table row from a run directory."""
    frame = analysis.load_runs([run_dir])
    last = int(frame["round"].max())
    accuracy = _rows(frame, "server", "accuracy", clients=False)
    comm = analysis.communication(frame)
    comm = comm[comm["round"] >= 1]
    elapsed = _rows(frame, "server", "elapsed", clients=False).set_index("round")
    per_round = (elapsed.loc[last, "value"] - elapsed.loc[1, "value"]) / max(
        last - 1, 1
    )
    exchanges = _rows(frame, "train", "exchanges", clients=False)["value"]
    per_round_exchanges = exchanges.mean() if len(exchanges) else 1.0
    # Round 1 includes the clients' start-up (actors, data, model): timings
    # leave it out when there are later rounds.
    first = 2 if last > 1 else 1
    waited = _rows(frame, "train", "seconds", clients=False)
    waited = waited[waited["round"] >= first]["value"].mean()
    compute = _rows(frame, "train", "seconds", clients=True)
    compute = compute[compute["round"] >= first]
    sequential = str(frame["strategy"].iloc[0]) == "sfl-v2"
    clients = compute["client"].nunique()
    messages = per_round_exchanges * (1 if sequential else clients)
    if sequential:  # every client answers the opening exchange, one the others
        messages = per_round_exchanges - 1 + clients
    per_message = compute.groupby("round")["value"].sum().mean() / messages
    return {
        "experiment": f"`{frame['name'].iloc[0]}`",
        "strategy": str(frame["strategy"].iloc[0]),
        "rounds": str(last),
        "accuracy": f"{accuracy['value'].iloc[-1]:.4f}",
        "MB up / round": f"{comm['bytes_up'].mean() / 1e6:.3f}",
        "MB down / round": f"{comm['bytes_down'].mean() / 1e6:.3f}",
        "exchanges / round": f"{per_round_exchanges:.0f}",
        "s / round": f"{per_round:.2f}",
        "s / exchange (server wait)": f"{waited / per_round_exchanges:.3f}",
        "client s / message": f"{per_message:.4f}",
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/split-table"))
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--read", nargs="+", type=Path, help="tabulate these runs")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into its docs page",
    )
    args = parser.parse_args(argv)
    if args.write_docs:
        check_block("methods/split-learning.md", "split-compare")
    if args.read:
        dirs = args.read
    else:
        dirs = [run(exp, [*extra, *args.overrides], args.out) for exp, extra in RUNS]
    table = markdown([row(d) for d in dirs], ("experiment", "strategy"))
    print(table)
    if args.write_docs:
        page = write_block("methods/split-learning.md", "split-compare", table)
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
