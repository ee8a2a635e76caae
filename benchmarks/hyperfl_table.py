"""The HyperFL table of the docs: HyperFL against FedAvg's global model,
personalised FedAvg (FedAvg-FT) and local-only training, over seeds.

Usage::

    python benchmarks/hyperfl_table.py [--out DIR] [--seeds 0,1,2]
                                       [--split iid|skew|lpm] [--set KEY=VALUE ...]

One ``fedsim sweep`` of ``experiments/hyperfl_digits.toml`` over the seeds x
the variants below, on one of two federations: ``iid`` (default; 20 clients,
IID shards of digits, ~57 examples each: local-only training is weak, which is
the setting where a shared model should help; the HyperFL paper's clients hold
a small IID share of each class) or ``skew`` (the file as written: two classes
per client, where local-only is strong). Prints mean ± std over seeds of the
last round's personalised accuracy (each client on its own local test split:
the example-weighted mean and the worst client), bytes per round (up + down,
all clients and phases) and which pairs' intervals separate. Rows:

- ``hyperfl``: shared hypernetwork, private embeddings and heads;
- ``fedavg``: the global model evaluated on each client's test split;
- ``fedavg-ft``: personalised FedAvg, the global model trained
  ``train.epochs`` epochs on the client's train split before evaluation
  (``strategy.finetune-epochs``): each client's locally trained model, the
  paper's FedAvg row;
- ``local``: each client trains only on its own data;
- ``fedper``: FedAvg of the body, each client's own head (FedPer).

``--split lpm`` is HyperFL-LPM instead (``experiments/hyperfl_lpm_vit.toml``
as shipped: a ViT pre-trained on digits 0-4, 10 clients, two classes each)
against the rules of the reference's ViT code (``vit/methods``: FedAvg,
FedAvg-Adapter, Local, Local-Adapter, HyperFL-LPM) that fedsim has:

- ``hyperfl-lpm``: generated rank-4 LoRA factors, private embeddings and heads;
- ``fedit``: FedAvg of the LoRA factors (continued every round) and of the
  head, the global adapter evaluated on each client's split
  (FedAvg-Adapter; fedit has no fine-tuned evaluation);
- ``fedavg`` / ``fedavg-ft``: FedAvg of the whole pre-trained ViT (no
  adapters: the file without ``[peft]``), the global model / each client's
  locally trained model (the reference's FedAvg row);
- ``local``: each client fine-tunes the whole ViT alone (Local);
- ``fedper``: FedAvg of the whole ViT body, private heads.

Local-Adapter (local-only LoRA training) has no fedsim row: the ``local``
family trains full models only. The LPM table adds kB per client per round
(up + down, all phases, over ``federation.clients``).

``--variants a,b`` runs only those rows (a sweep of its own); ``--also DIR``
adds the completed runs of an earlier sweep directory to the table.
``--write-docs`` also writes the table, the separations and the paper's
claims into ``docs/methods/hyperfl.md`` (block ``hyperfl-<split>``).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from cli_run import markdown
from pages import write_block
from seeds import (
    ROOT,
    interval,
    mean_std,
    read_sweep,
    seeds_argument,
    separated,
    sweep_runs,
)

from fedsim import analysis

BASE = ROOT / "experiments/hyperfl_digits.toml"
LPM_BASE = ROOT / "experiments/hyperfl_lpm_vit.toml"
#: The docs block each split's table is written into (``--write-docs``).
BLOCKS = {"iid": "hyperfl-iid", "skew": "hyperfl-skew", "lpm": "hyperfl-lpm"}
SPLITS = {
    "iid": ["data.partitioner=iid"],
    "skew": [],
    "lpm": [],
}
VARIANTS = (
    {"name": "hyperfl", "strategy.name": "hyperfl"},
    {"name": "fedavg", "strategy.name": "fedavg"},
    {"name": "fedavg-ft", "strategy.name": "fedavg", "strategy.finetune-epochs": -1},
    {"name": "local", "strategy.name": "local"},
    {"name": "fedper", "strategy.name": "fedper"},
)
PAIRS = (
    ("hyperfl", "local"),
    ("hyperfl", "fedavg-ft"),
    ("hyperfl", "fedavg"),
    ("hyperfl", "fedper"),
    ("fedavg", "fedavg-ft"),
)

#: ``--split lpm``: rows on the LoRA file as shipped, and rows on the same file
#: without ``[peft]`` (the whole pre-trained ViT trained).
LPM_LORA = (
    {"name": "hyperfl-lpm", "strategy.name": "hyperfl-lpm"},
    {"name": "fedit", "strategy.name": "fedit"},
)
LPM_FULL = (
    {"name": "fedavg", "strategy.name": "fedavg"},
    {"name": "fedavg-ft", "strategy.name": "fedavg", "strategy.finetune-epochs": -1},
    {"name": "local", "strategy.name": "local"},
    {"name": "fedper", "strategy.name": "fedper"},
)
LPM_PAIRS = (
    ("hyperfl-lpm", "fedit"),
    ("hyperfl-lpm", "fedavg-ft"),
    ("hyperfl-lpm", "fedavg"),
    ("hyperfl-lpm", "local"),
    ("hyperfl-lpm", "fedper"),
    ("fedit", "fedavg"),
)
#: HyperFL-LPM's claim (the paper's abstract and LPM section: performance
#: comparable to its non-private rivals; its LPM table's numbers were not
#: reachable offline): (rival, claim).
LPM_CLAIMS = (
    ("fedavg-ft", "HyperFL-LPM comparable to FedAvg, each client's trained model"),
    ("local", "HyperFL-LPM comparable to local-only training"),
    ("fedit", "HyperFL-LPM comparable to FedAvg of the adapters"),
)

#: The HyperFL paper's claims (Guo et al., AAAI 2025, Table 1, EMNIST, 20
#: clients): (HyperFL's rival, the claim).
CLAIMS = (
    (
        "fedavg-ft",
        "HyperFL above FedAvg, each client's locally trained model (76.29 vs 72.77)",
    ),
    ("local", "HyperFL above local-only training (sharing the hypernetwork pays)"),
)


def verdict(ours: list[float], rival: list[float]) -> str:
    """ "ours > rival": reproduced / not reproduced where the mean ± std
    intervals separate, inconclusive where they overlap."""
    lo, hi = interval(ours)
    rival_lo, rival_hi = interval(rival)
    if lo > rival_hi:
        return "reproduced"
    if hi < rival_lo:
        return "not reproduced (lower)"
    return "inconclusive (intervals overlap)"


def comparable(ours: list[float], rival: list[float]) -> str:
    """ "ours ~ rival": consistent where the mean ± std intervals overlap."""
    if not separated(ours, rival):
        return "consistent (intervals overlap)"
    lower = interval(ours)[1] < interval(rival)[0]
    return f"not reproduced ({'lower' if lower else 'higher'})"


def without_peft(path: Path) -> dict:
    """The experiment file's tables without ``[peft]``: the whole model trains."""
    table = tomllib.loads(path.read_text())
    table.pop("peft", None)
    return table


def measure(run_dir: Path) -> dict[str, float]:
    """The last round of one run."""
    frame = analysis.load_runs([run_dir])
    last = int(frame["round"].max())
    clients = analysis.client_metric(frame, "accuracy", "evaluate")
    headline = analysis.round_metric(frame, "accuracy", "evaluate")
    comm = analysis.communication(frame)
    comm = comm[comm["round"] >= 1]
    config = tomllib.loads((run_dir / "config.toml").read_text())
    return {
        "mean": float(headline.iloc[-1, -1]),
        "worst": float(clients[clients["round"] == last]["value"].min()),
        "mb": float(comm["bytes"].mean() / 1e6),
        "kb_client": float(
            comm["bytes"].mean() / 1e3 / config["federation"]["clients"]
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tables"))
    parser.add_argument("--seeds", type=seeds_argument, default=[0, 1, 2])
    parser.add_argument("--split", choices=sorted(SPLITS), default="iid")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", default="", help="comma-separated rows to run")
    parser.add_argument("--also", type=Path, action="append", default=[])
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into docs/methods/hyperfl.md",
    )
    args = parser.parse_args()
    overrides = [*SPLITS[args.split], *args.overrides]
    lpm = args.split == "lpm"
    base = LPM_BASE if lpm else BASE
    epochs = next(
        (int(o.split("=")[1]) for o in overrides if o.startswith("train.epochs=")),
        None,
    )
    if epochs is None:
        from fedsim.core.loading import load_experiment

        epochs = load_experiment(base, overrides).train.epochs
    chosen = [n for n in args.variants.split(",") if n]

    def pick(table: tuple[dict, ...]) -> list[dict]:
        return [
            {k: (epochs if v == -1 else v) for k, v in variant.items()}
            for variant in table
            if not chosen or variant["name"] in chosen
        ]

    name = "-".join([f"hyperfl-{args.split}", *chosen])
    sweeps = (
        [
            (base, pick(LPM_LORA), name),
            (without_peft(base), pick(LPM_FULL), f"{name}-full"),
        ]
        if lpm
        else [(base, pick(VARIANTS), name)]
    )
    runs: dict[str, list[Path]] = {}
    for table, variants, sweep in sweeps:
        if variants:
            runs.update(
                sweep_runs(
                    table,
                    variants,
                    args.seeds,
                    args.out,
                    name=sweep,
                    overrides=overrides,
                )
            )
    for folder in args.also:
        for key, dirs in read_sweep(folder, skip_failed=True).items():
            runs.setdefault(key, []).extend(dirs)
    measured = {name: [measure(d) for d in dirs] for name, dirs in runs.items()}
    rows = [
        {
            "strategy": f"`{name}`",
            "seeds": str(len(m)),
            "accuracy (mean)": mean_std([r["mean"] for r in m]),
            "accuracy (worst client)": mean_std([r["worst"] for r in m]),
            "MB / round": mean_std([r["mb"] for r in m], 2),
            **(
                {"kB / client / round": mean_std([r["kb_client"] for r in m], 1)}
                if lpm
                else {}
            ),
        }
        for name, m in measured.items()
    ]
    lines = [markdown(rows, ("strategy",)), ""]
    pairs, ours = (LPM_PAIRS, "hyperfl-lpm") if lpm else (PAIRS, "hyperfl")
    for a, b in [(a, b) for a, b in pairs if a in measured and b in measured]:
        apart = separated(
            [r["mean"] for r in measured[a]], [r["mean"] for r in measured[b]]
        )
        verdict_ = "intervals separate" if apart else "intervals overlap"
        lines.append(f"- {a} vs {b}, mean accuracy: {verdict_}")
    rule = comparable if lpm else verdict
    claims = [
        {
            "row": f"`{ours}`",
            "paper's claim": claim,
            "here": rule(
                [r["mean"] for r in measured[ours]],
                [r["mean"] for r in measured[rival]],
            ),
        }
        for rival, claim in (LPM_CLAIMS if lpm else CLAIMS)
        if ours in measured and rival in measured
    ]
    if claims:
        lines += ["", markdown(claims, ("row", "paper's claim", "here"))]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_block("methods/hyperfl.md", BLOCKS[args.split], text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
