"""The DP-FedAvg table of the docs, over seeds: no DP, fixed clipping and
adaptive clipping with the centred and the uncentred count release, each at the
same target epsilon, on ``experiments/dp_fedavg.toml``'s federation (100 clients,
30 per round, synthetic 4-class data, MLP).

One ``fedsim sweep`` (:mod:`seeds`); prints final server accuracy, the server's
epsilon and the last clipping norm (adaptive) as mean ± std over the seeds, and
which accuracy differences have separated intervals.

Usage::

    python benchmarks/dp_fedavg_table.py --seeds 0,1,2 --epsilon 8 [--write-docs]

``--write-docs`` also writes the table and the separated pairs into
``docs/methods/differential-privacy.md`` (block ``dp-fedavg``, :mod:`pages`).
"""

from __future__ import annotations

import argparse
import tempfile
import tomllib
from pathlib import Path

import pandas as pd
from pages import check_block, write_block
from seeds import ROOT, mean_std, seeds_argument, separated, sweep_runs

BASE = ROOT / "experiments" / "dp_fedavg.toml"


def variants(epsilon: float) -> list[dict[str, object]]:
    dp = {
        "privacy.mechanism": "dp-fedavg",
        "privacy.target-epsilon": epsilon,
        "privacy.target-delta": 1e-5,
        "privacy.clipping-norm": 1.0,
    }
    adaptive = {**dp, "privacy.clipping": "adaptive"}
    return [
        {"name": "no-dp", "privacy.mechanism": "none"},
        {"name": "fixed", **dp, "privacy.clipping": "fixed"},
        {"name": "adaptive-centred", **adaptive, "privacy.count-release": "centred"},
        {
            "name": "adaptive-uncentred",
            **adaptive,
            "privacy.count-release": "uncentred",
        },
    ]


def last(run: Path, metric: str) -> float:
    frame = pd.read_parquet(run / "metrics.parquet")
    rows = frame[(frame["phase"] == "server") & (frame["metric"] == metric)]
    if rows.empty:
        rows = frame[frame["client"].isna() & (frame["metric"] == metric)]
    return (
        float(rows.sort_values("round")["value"].iloc[-1])
        if len(rows)
        else float("nan")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seeds_argument, default=[0, 1, 2])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into its docs page",
    )
    args = parser.parse_args()
    if args.write_docs:
        check_block("methods/differential-privacy.md", "dp-fedavg")
    base = tomllib.loads(BASE.read_text())
    base.pop("privacy")  # each variant sets its own (none reads no privacy key)
    out = args.out or Path(tempfile.mkdtemp(prefix="dp-fedavg-table-"))
    runs = sweep_runs(base, variants(args.epsilon), args.seeds, out, name="dp_fedavg")
    accuracy = {k: [last(r, "accuracy") for r in v] for k, v in runs.items()}
    print(f"seeds {args.seeds}, target epsilon {args.epsilon}, runs in {out}\n")
    lines = ["| run | accuracy | server epsilon | last clipping norm |"]
    lines.append("| --- | ---: | ---: | ---: |")
    for name, dirs in runs.items():
        eps = [last(r, "epsilon") for r in dirs]
        norm = [last(r, "clipping-norm") for r in dirs]
        lines.append(
            f"| {name} | {mean_std(accuracy[name])} | "
            f"{mean_std(eps) if eps[0] == eps[0] else '∞'} | "
            f"{mean_std(norm) if norm[0] == norm[0] else '-'} |"
        )
    print("\n".join(lines))
    names = list(accuracy)
    pairs = [
        f"{a} vs {b}"
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if separated(accuracy[a], accuracy[b])
    ]
    verdict = f"Separated accuracy intervals: {', '.join(pairs) or 'none'}."
    print("\n" + verdict)
    if args.write_docs:
        seeds = ", ".join(map(str, args.seeds))
        text = f"Seeds {seeds}, target epsilon {args.epsilon:g}:\n\n"
        page = write_block(
            "methods/differential-privacy.md",
            "dp-fedavg",
            text + "\n".join(lines) + "\n\n" + verdict,
        )
        print(f"wrote {page}")


if __name__ == "__main__":
    main()
