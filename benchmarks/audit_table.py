"""The privacy-audit table of the README: Inverting Gradients against what FedAvg,
FedAvg under DP-SGD, FLoRA and HyperFL upload, at local batch size 8 (one step
on the client's 8 images) and 1 (8 steps of one image); activation inversion
against split learning's first batch of cut activations (``audit_sfl.toml`` and
the variants in :data:`SPLIT`: 8 images or one).

Usage::

    python benchmarks/audit_table.py [--out DIR] [--set KEY=VALUE ...]
    python benchmarks/audit_table.py --read RUN_DIR ... [--figure PNG]

Runs every ``experiments/audit_*.toml`` (the split variants too) with ``fedsim
run`` as a user would, once per batch size, reads the run directories with
:mod:`fedsim.analysis` and prints a Markdown table: the mean ``attack-psnr``
over the attacked clients (each reconstruction scored by its best PSNR against
the client's partition), each client's value, and the audit phase's seconds
(split runs: no local steps, the batch is the number of images attacked), then
the scores that carry no
information (the mean digit, uniform noise: :func:`floors`). ``--figure``
stacks the first attacked client's grid of every run (originals above
reconstructions) into one PNG. ``--set`` applies to every run (``--set
audit.iterations=100`` for a quick check). Run directories go to ``DIR``
(default ``runs/audit-table``).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from cli_run import markdown, run, table_parser

from fedsim import analysis

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("fedavg", "dp_sgd", "flora", "hyperfl")
BATCH_SIZES = (8, 1)
#: ``audit_sfl.toml`` (the mlp cut after its first ReLU) and its variants:
#: the cnn at its default cut, its activations as int4 codes, U-shaped, SFPrompt
#: (the pre-trained ViT of ``sfprompt_vit.toml``, head = embedding + block 0).
SPLIT: tuple[tuple[str, ...], ...] = (
    (),
    ("model.name=cnn", "split.cut=features.4"),
    ("model.name=cnn", "split.cut=features.4", "split.quantization=int4"),
    ("strategy.name=split-ushape", "model.name=cnn", "split.cut=features.4"),
    (
        "strategy.name=sfprompt",
        "model.name=vit",
        "model.depth=2",
        "model.heads=4",
        "model.patch-size=2",
        "model.pretrain=digits",
        "model.pretrain-classes=[0,1,2,3,4]",
        "model.pretrain-epochs=20",
        "split.cut=blocks.0",
        "split.tail=pool",
        "train.optimizer=adam",
        "train.lr=0.003",
    ),
)
#: What the server sees of one client's round, per experiment name.
SEES = {
    "audit-fedavg": "whole model",
    "audit-dp-sgd": "whole model, DP-SGD noised (σ = 1)",
    "audit-flora": "LoRA factors + head",
    "audit-hyperfl": "hypernetwork only",
}


def _config(run_dir: Path) -> dict:  # type: ignore[type-arg]
    return tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))


def split_sees(config: dict) -> str:  # type: ignore[type-arg]
    """What the server sees of a split run: whose activations, where cut."""
    split = config["split"]
    codec = split["quantization"]
    coded = "" if codec == "none" else f", {codec}"
    return (
        f"{config['strategy']['name']}: activations of {config['model']['name']} "
        f"{split['cut']}{coded}"
    )


def row(run_dir: Path) -> dict[str, str]:
    """One table row from a run directory."""
    config = _config(run_dir)
    split = "split" in config
    frame = analysis.load_runs([run_dir])
    rows = frame[frame["metric"] == "attack-psnr"]
    per_client = rows[rows["client"].notna()].sort_values("client")
    spent = frame[(frame["phase"] == "audit") & (frame["metric"] == "seconds")]
    name = str(config["name"]).rsplit("-b", 1)[0].replace("_", "-")
    batch = int(config["train"]["batch-size"])
    return {
        "experiment": f"`{name}`",
        "server sees": split_sees(config) if split else SEES.get(name, "-"),
        "batch size": str(batch),
        "local steps": "-"
        if split
        else str(-(-8 // batch) * int(config["train"]["epochs"])),
        "attack PSNR (dB, mean)": f"{per_client['value'].mean():.2f}",
        "per client": ", ".join(f"{v:.1f}" for v in per_client["value"]),
        "audit s": f"{spent['value'].sum():.0f}",
    }


def floors() -> str:
    """What scores carry no information: the mean digit of the global test set
    and uniform noise (8 images, seed 0), each scored like a reconstruction
    against every client's partition of ``audit_fedavg.toml``, mean over
    clients."""
    import numpy as np

    from fedsim.audit.maths import best_matches
    from fedsim.core.loading import load_experiment
    from fedsim.learn.data import federated_data

    exp = load_experiment(ROOT / "experiments" / "audit_fedavg.toml")
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    rng = np.random.default_rng(0)
    mean, noise = [], []
    for rows in data.partitions:
        images = data.pool.x[rows]
        mean.append(best_matches(data.test.x.mean(0, keepdims=True), images)[1])
        noise.append(best_matches(rng.random((8, *images.shape[1:])), images)[1])
    return (
        f"floors: mean digit {np.mean(np.concatenate(mean)):.2f} dB, "
        f"uniform noise {np.mean(np.concatenate(noise)):.2f} dB"
    )


def figure(dirs: list[Path], path: Path) -> None:
    """The first attacked client's grid of every run, one above the other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    fig, axes = plt.subplots(len(dirs), 1, figsize=(4.2, 1.05 * len(dirs)))
    for ax, run_dir in zip(axes, dirs):
        grid = sorted((run_dir / "attacks").glob("*.png"))[0]
        r = row(run_dir)
        ax.imshow(imread(grid))
        ax.set_axis_off()
        split = r["local steps"] == "-"
        label = r["server sees"] if split else r["experiment"].strip("`")
        ax.set_title(
            f"{label}, batch {r['batch size']}: {r['attack PSNR (dB, mean)']} dB",
            fontsize=7,
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = table_parser(__doc__, "runs/audit-table")
    parser.add_argument("--figure", type=Path, help="write the reconstructions here")
    parser.add_argument(
        "--split-only", action="store_true", help="run the split-learning rows only"
    )
    args = parser.parse_args()
    if args.read:
        dirs = list(args.read)
    else:
        dirs = []
        for name in () if args.split_only else EXPERIMENTS:
            experiment = ROOT / "experiments" / f"audit_{name}.toml"
            for batch in BATCH_SIZES:
                sets = [f"train.batch-size={batch}", *args.overrides]
                dirs.append(run(experiment, sets, args.out))
                print(dirs[-1], file=sys.stderr, flush=True)
        experiment = ROOT / "experiments" / "audit_sfl.toml"
        for variant in SPLIT:
            for batch in BATCH_SIZES:
                sets = [*variant, f"train.batch-size={batch}", *args.overrides]
                dirs.append(run(experiment, sets, args.out))
                print(dirs[-1], file=sys.stderr, flush=True)
    print(markdown([row(d) for d in dirs], ("experiment", "server sees", "per client")))
    print(floors())
    if args.figure:
        figure(dirs, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
