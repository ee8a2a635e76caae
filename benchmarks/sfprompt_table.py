"""The SFPrompt table of the docs: SFPrompt, U-shaped split fine-tuning and
federated full fine-tuning (FedAvg of the whole pre-trained ViT, the paper's
baseline) on one federation, over seeds.

Usage::

    python benchmarks/sfprompt_table.py [--out DIR] [--seeds 0,1,2]
                                        [--set KEY=VALUE ...]

Two ``fedsim sweep`` runs (a split family's ``[split]`` keys are unknown to
FedAvg): ``experiments/split_ushape_vit.toml`` with SFPrompt's keys as a
variant, and the same experiment without ``[split]`` under FedAvg. Prints mean ±
std over seeds of the global model's accuracy after the last round (the
server's held-out test set), the bytes up + down over the run (all clients,
rounds and phases) and their ratio to full fine-tuning's, and which pairs'
accuracy intervals separate.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from cli_run import markdown
from seeds import ROOT, mean_std, seeds_argument, separated, sweep_runs

from fedsim import analysis

USHAPE = ROOT / "experiments/split_ushape_vit.toml"
SPLIT_VARIANTS = (
    {"name": "split-ushape"},
    {
        "name": "sfprompt",
        "strategy.name": "sfprompt",
        "split.prompts": 4,
        "split.keep-fraction": 0.5,
        "split.local-epochs": 1,
    },
)
FULL = ({"name": "fedavg-full-ft", "strategy.name": "fedavg"},)


def measure(run_dir: Path) -> dict[str, float]:
    """One run: final server accuracy and total bytes."""
    frame = analysis.load_runs([run_dir])
    server = analysis.round_metric(frame, "accuracy", "server")
    comm = analysis.communication(frame)
    return {
        "accuracy": float(server.iloc[-1, -1]),
        "mb": float(comm["bytes"].sum() / 1e6),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tables"))
    parser.add_argument("--seeds", type=seeds_argument, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    runs = sweep_runs(
        USHAPE,
        SPLIT_VARIANTS,
        args.seeds,
        args.out,
        name="sfprompt-split",
        overrides=args.overrides,
    )
    full = {k: v for k, v in tomllib.loads(USHAPE.read_text()).items() if k != "split"}
    runs.update(
        sweep_runs(
            full,
            FULL,
            args.seeds,
            args.out,
            name="sfprompt-full",
            overrides=args.overrides,
        )
    )
    measured = {name: [measure(d) for d in dirs] for name, dirs in runs.items()}
    base_mb = sum(r["mb"] for r in measured["fedavg-full-ft"]) / len(
        measured["fedavg-full-ft"]
    )
    rows = [
        {
            "experiment": f"`{name}`",
            "seeds": str(len(m)),
            "accuracy": mean_std([r["accuracy"] for r in m]),
            "MB total": mean_std([r["mb"] for r in m], 2),
            "vs full fine-tuning": f"{sum(r['mb'] for r in m) / len(m) / base_mb:.2f}",
        }
        for name, m in measured.items()
    ]
    print(markdown(rows, ("experiment",)))
    print()
    names = list(measured)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            apart = separated(
                [r["accuracy"] for r in measured[a]],
                [r["accuracy"] for r in measured[b]],
            )
            verdict = "intervals separate" if apart else "intervals overlap"
            print(f"- {a} vs {b}, accuracy: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
