"""Measure the quickstart: total wall time, start-up, time per round, accuracy.

Usage::

    python benchmarks/quickstart.py [--repeat N] [--set KEY=VALUE ...]

Runs ``fedsim run`` (the packaged quickstart unless overridden) as a user would,
N times, and prints one JSON line per run plus a summary line. ``--write-docs``
(only without ``--set``: the page shows the quickstart as shipped) also writes
a table of the runs into ``docs/tutorials/first-run.md`` (block ``quickstart``,
:mod:`pages`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from cli_run import fedsim_run, markdown
from pages import check_block, write_block


def one_run(overrides: list[str]) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc, run_dir = fedsim_run(None, overrides, Path(out))
        total = time.perf_counter() - start
        summary = json.loads((run_dir / "summary.json").read_text())
        frame = pd.read_parquet(run_dir / "metrics.parquet")
        server = frame[frame["phase"] == "server"].pivot(
            index="round", columns="metric", values="value"
        )
        rounds = server.index.max()
        first, last = server.loc[1, "elapsed"], server.loc[rounds, "elapsed"]
        return {
            "exit": proc.returncode,
            "status": summary["status"],
            "total_seconds": round(total, 1),
            "until_round_0_seconds": round(server.loc[0, "elapsed"], 1),
            "first_round_seconds": round(first - server.loc[0, "elapsed"], 1),
            "later_round_seconds": round((last - first) / max(rounds - 1, 1), 2),
            "final_accuracy": round(float(server.loc[rounds, "accuracy"]), 4),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into its docs page",
    )
    args = parser.parse_args()
    if args.write_docs and args.overrides:
        parser.error("--write-docs: the docs show the quickstart as shipped (no --set)")
    if args.write_docs:
        check_block("tutorials/first-run.md", "quickstart")
    results = []
    for _ in range(args.repeat):
        results.append(one_run(args.overrides))
        print(json.dumps(results[-1]), flush=True)
    totals = [r["total_seconds"] for r in results]
    accuracy = [r["final_accuracy"] for r in results]
    print(
        json.dumps(
            {
                "runs": len(results),
                "total_seconds_max": max(totals),
                "final_accuracy_min": min(accuracy),
            }
        )
    )
    if args.write_docs:
        rows = [
            {
                "run": str(i + 1),
                "exit": str(r["exit"]),
                "wall s": f"{r['total_seconds']:.1f}",
                "until round 0 s": f"{r['until_round_0_seconds']:.1f}",
                "round 1 s": f"{r['first_round_seconds']:.1f}",
                "later rounds s": f"{r['later_round_seconds']:.2f}",
                "final server accuracy": f"{r['final_accuracy']:.4f}",
            }
            for i, r in enumerate(results)
        ]
        page = write_block("tutorials/first-run.md", "quickstart", markdown(rows, ()))
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
