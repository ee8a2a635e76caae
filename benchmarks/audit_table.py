"""The privacy-audit table of the README: Inverting Gradients against what FedAvg,
FedAvg under DP-SGD, FLoRA and HyperFL upload, at local batch size 8 (one step
on the client's 8 images) and 1 (8 steps of one image).

Usage::

    python benchmarks/audit_table.py [--out DIR] [--set KEY=VALUE ...]
    python benchmarks/audit_table.py --read RUN_DIR ... [--figure PNG]

Runs every ``experiments/audit_*.toml`` with ``fedsim run`` as a user would, once
per batch size, reads the run directories with :mod:`fedsim.analysis` and prints
a Markdown table: the mean ``attack-psnr`` over the attacked clients (each
reconstruction scored by its best PSNR against the client's partition), each
client's value, and the audit phase's seconds, then the scores that carry no
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
#: What the server sees of one client's round, per experiment name.
SEES = {
    "audit-fedavg": "whole model",
    "audit-dp-sgd": "whole model, DP-SGD noised (σ = 1)",
    "audit-flora": "LoRA factors + head",
    "audit-hyperfl": "hypernetwork only",
}


def _config(run_dir: Path) -> dict:  # type: ignore[type-arg]
    return tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))


def row(run_dir: Path) -> dict[str, str]:
    """One table row from a run directory."""
    config = _config(run_dir)
    frame = analysis.load_runs([run_dir])
    rows = frame[frame["metric"] == "attack-psnr"]
    per_client = rows[rows["client"].notna()].sort_values("client")
    spent = frame[(frame["phase"] == "audit") & (frame["metric"] == "seconds")]
    name = str(config["name"]).rsplit("-b", 1)[0].replace("_", "-")
    batch = int(config["train"]["batch-size"])
    return {
        "experiment": f"`{name}`",
        "server sees": SEES.get(name, "-"),
        "batch size": str(batch),
        "local steps": str(-(-8 // batch) * int(config["train"]["epochs"])),
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
        ax.set_title(
            f"{r['experiment'].strip('`')}, batch {r['batch size']}: "
            f"{r['attack PSNR (dB, mean)']} dB",
            fontsize=7,
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = table_parser(__doc__, "runs/audit-table")
    parser.add_argument("--figure", type=Path, help="write the reconstructions here")
    args = parser.parse_args()
    if args.read:
        dirs = list(args.read)
    else:
        dirs = []
        for name in EXPERIMENTS:
            experiment = ROOT / "experiments" / f"audit_{name}.toml"
            for batch in BATCH_SIZES:
                sets = [f"train.batch-size={batch}", *args.overrides]
                dirs.append(run(experiment, sets, args.out))
                print(dirs[-1], file=sys.stderr, flush=True)
    print(markdown([row(d) for d in dirs], ("experiment", "server sees", "per client")))
    print(floors())
    if args.figure:
        figure(dirs, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
