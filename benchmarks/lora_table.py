"""The LoRA results table of the docs: FLoRA, FedIT (continuing adapters),
FedIT's averaging in FLoRA's merge-and-restart round (``fedit-merge``) and
full-model FedAvg fine-tuning of one pre-trained base, homogeneous and
heterogeneous ranks, over seeds.

Usage::

    python benchmarks/lora_table.py [--out DIR] [--seeds 0,1,2] [--with-fedavg]
                                    [--set KEY=VALUE ...]

One ``fedsim sweep`` (start-up paid once) of ``experiments/flora_r8.toml`` over
the seeds x the variants below. Each seed's pre-trained base is built (cached)
before the sweep, so no run's wall time includes pre-training. Prints a
Markdown table with mean ± std over seeds of: accuracy of the final global
model and its mean over rounds 1..R (how fast it learns) on the held-out test
set, the mean ``aggregation-error`` over rounds, bytes down + up summed over
all clients, rounds and phases, and the run's wall time; then which pairs'
intervals separate. ``--set`` applies to every experiment (e.g. ``--set
rounds=3`` for a quick check). Runs go to ``DIR/lora`` (default ``runs/tables``).
``--write-docs`` also writes the table and the separations into
``docs/methods/lora.md`` (block ``lora``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from cli_run import markdown
from pages import write_block
from seeds import ROOT, mean_std, seeds_argument, separated, sweep_runs

BASE = ROOT / "experiments/flora_r8.toml"
HETERO = {"peft.ranks": [16, 8, 4, 4, 2], "peft.alpha-per-rank": 2.0}
#: Every rank's scaling is 2: alpha 16 at rank 8, lora_alpha = 2 r with mixed
#: ranks (the FLoRA reference's heterogeneous setting).
VARIANTS = (
    {"name": "flora-r8"},
    {"name": "fedit-r8", "strategy.name": "fedit"},
    {"name": "fedit-merge-r8", "strategy.name": "fedit-merge"},
    {"name": "flora-hetero", **HETERO},
    {"name": "fedit-hetero", "strategy.name": "fedit", **HETERO},
)
#: Full-model FedAvg fine-tuning of the same base (``--with-fedavg``).
FEDAVG = {"name": "fedavg-finetune", "strategy.name": "fedavg", "peft.method": "none"}
PAIRS = (
    ("flora-r8", "fedit-r8"),
    ("fedit-r8", "fedit-merge-r8"),
    ("flora-hetero", "fedit-hetero"),
)


def warm_cache(seeds: list[int], overrides: list[str]) -> None:
    """Build (or load) each seed's pre-trained base in this process."""
    from fedsim.core.loading import load_experiment
    from fedsim.learn.base import build_model
    from fedsim.learn.data import federated_data

    for seed in seeds:
        exp = load_experiment(BASE, [*overrides, f"seed={seed}"])
        data = federated_data(exp.data, exp.federation.clients, exp.seed)
        build_model(exp.model, data.info, exp.seed)


def measure(run_dir: Path) -> dict[str, float]:
    """One run's numbers."""
    summary = json.loads((run_dir / "summary.json").read_text())
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    agg = frame[frame["client"].isna()]
    server = agg[(agg["phase"] == "server") & (agg["metric"] == "accuracy")]
    server = server.set_index("round")["value"]
    error = agg[agg["metric"] == "aggregation-error"]["value"]
    down = agg[agg["metric"] == "bytes-down"]["value"].sum()
    up = agg[agg["metric"] == "bytes-up"]["value"].sum()
    return {
        "base": float(server.loc[0]),
        "final": float(server.iloc[-1]),
        "mean": float(server.loc[1:].mean()),
        "error": float(error.mean()) if len(error) else float("nan"),
        "mb": float((down + up) / 1e6),
        "wall": float(summary["wall_seconds"]),
    }


def row(name: str, runs: list[dict[str, float]]) -> dict[str, str]:
    """One table row: mean ± std over the seeds' runs."""

    def col(key: str, digits: int = 3) -> str:
        return mean_std([r[key] for r in runs], digits)

    errors = [r["error"] for r in runs]
    return {
        "experiment": f"`{name}`",
        "seeds": str(len(runs)),
        "base accuracy": col("base"),
        "final accuracy": col("final"),
        "mean accuracy": col("mean"),
        "aggregation error": "-"
        if any(e != e for e in errors)
        else f"{sum(errors) / len(errors):.2e}",
        "MB total": col("mb", 2),
        "wall s": col("wall", 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tables"))
    parser.add_argument("--seeds", type=seeds_argument, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--with-fedavg", action="store_true", help="add " + FEDAVG["name"]
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into docs/methods/lora.md",
    )
    args = parser.parse_args()
    variants = [*VARIANTS, FEDAVG] if args.with_fedavg else list(VARIANTS)
    warm_cache(args.seeds, args.overrides)
    runs = sweep_runs(
        BASE, variants, args.seeds, args.out, name="lora", overrides=args.overrides
    )
    measured = {name: [measure(d) for d in dirs] for name, dirs in runs.items()}
    lines = [markdown([row(n, m) for n, m in measured.items()], ("experiment",))]
    lines.append("")
    for a, b in [(a, b) for a, b in PAIRS if a in measured and b in measured]:
        for key in ("final", "mean"):
            apart = separated(
                [r[key] for r in measured[a]], [r[key] for r in measured[b]]
            )
            verdict = "intervals separate" if apart else "intervals overlap"
            lines.append(f"- {a} vs {b}, {key} accuracy: {verdict}")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_block("methods/lora.md", "lora", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
