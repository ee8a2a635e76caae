"""The instruction-tuning table of the docs: FLoRA, FedIT (homogeneous r = 8
and heterogeneous ranks 16/8/4/2) and full fine-tuning (FedAvg) of a LLaMA-shaped
causal LM, mean ± std over seeds.

Usage::

    python benchmarks/hf_assets.py --out runs/hf
    fedsim sweep experiments/llama_instruct.toml --out runs/llama-instruct
    python benchmarks/hf_instruct_table.py runs/llama-instruct/<sweep folder>

Reads every run directory under the folder given and prints, per method, the
base's server-side loss (round 0), the final server-side loss and perplexity on
the held-out rows, and the bytes sent down and up over the run (all clients,
rounds and phases), each as mean ± std (sample std) over the seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def method(run_dir: Path) -> str:
    from fedsim.core.loading import load_experiment

    exp = load_experiment(run_dir / "config.toml")
    if exp.peft.method == "none":
        return "full (fedavg)"
    ranks = "/".join(map(str, exp.peft.ranks)) if exp.peft.ranks else exp.peft.rank
    return f"{exp.strategy.name} r={ranks}"


def numbers(run_dir: Path) -> dict[str, float]:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    agg = frame[frame["client"].isna()]
    server = agg[agg["phase"] == "server"].pivot_table(
        index="round", columns="metric", values="value"
    )
    clients = frame[frame["client"].notna()]
    sent = clients[clients["metric"].isin(["bytes-down", "bytes-up"])]
    total = sent.groupby("metric")["value"].sum()
    return {
        "base loss": float(server["loss"].iloc[0]),
        "final loss": float(server["loss"].iloc[-1]),
        "final perplexity": float(server["perplexity"].iloc[-1]),
        "MB down": float(total.get("bytes-down", np.nan)) / 1e6,
        "MB up": float(total.get("bytes-up", np.nan)) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    rows = []
    for run_dir in sorted(p.parent for p in args.folder.rglob("metrics.parquet")):
        rows.append({"method": method(run_dir), **numbers(run_dir)})
    table = pd.DataFrame(rows)
    columns = [c for c in table.columns if c != "method"]
    print("| method | seeds | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for name, group in table.groupby("method", sort=False):
        cells = [f"{group[c].mean():.3f} ± {group[c].std(ddof=1):.3f}" for c in columns]
        print(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
