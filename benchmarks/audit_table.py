"""The privacy-audit table of the docs: every attack that applies against what
FedAvg, FedAvg under DP-SGD, FLoRA and HyperFL (with and without its mitigations)
upload, at local batch size 8 (one step on the client's 8 images) and 1 (8 steps
of one image); activation inversion against split learning's cut activations
(``audit_sfl.toml`` and the variants in :data:`SPLIT`: 8 images or one).

Usage::

    python benchmarks/audit_table.py [--out DIR] [--set KEY=VALUE ...]
        [--only NAME ...] [--batch-sizes 8 1] [--split-only]
    python benchmarks/audit_table.py --read RUN_DIR ... [--figure PNG]

Runs ``experiments/audit_*.toml`` (each with the attacks its ``[audit]`` lists:
Inverting Gradients and the analytic attacks for weight uploads) and the
variants in :data:`VARIANTS` with ``fedsim run`` as a user would, once per batch
size, reads the run directories with :mod:`fedsim.analysis` and prints a
Markdown table with one row per run and attack: the mean PSNR of the
reconstructions matched one to one to the client's images (Hungarian
assignment), how many of them are recovered (above ``audit.recovered-db``),
the budget (Inverting Gradients' iterations; "-": analytic, no optimisation),
and "not applicable" where the attack's assumptions fail (the run logged why);
then the scores that carry no information (the mean digit, uniform noise:
:func:`floors`). ``--only`` runs the named experiments or variants (e.g.
``--only fedavg hyperfl-no-head-bias``), ``--set`` applies to every run (``--set
audit.iterations=300`` for a quick check). Run directories go to ``DIR``
(default ``runs/audit-table``). ``--write-docs`` also writes the table and the
floors into ``docs/methods/privacy-audit.md``: its main table (the
weight-upload runs, usually gathered with ``--read``), or with ``--split-only``
(also with ``--read``) the split-learning table (the columns every split row
shares said once above it); :mod:`pages`.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pandas as pd
from cli_run import markdown, run, table_parser
from pages import check_block, write_block

from fedsim import analysis

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("fedavg", "dp_sgd", "flora", "hyperfl", "hyperfl_lpm")
#: Mitigations tried on HyperFL: name -> (experiment, overrides).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hyperfl-no-head-bias": ("hyperfl", ("strategy.head-bias=false",)),
    "hyperfl-private-heads": ("hyperfl", ("strategy.share=trunk",)),
}
BATCH_SIZES = (8, 1)
#: The attacks, in table order.
ATTACKS = (
    "inverting-gradients",
    "analytic",
    "analytic-multistep",
    "inverting-activations",
)
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
    "audit-hyperfl": "hypernetwork",
    "audit-hyperfl-lpm": "hypernetwork of LoRA factors (frozen pre-trained ViT)",
}


def hyperfl_sees(config: dict) -> str:  # type: ignore[type-arg]
    """HyperFL's upload, with its mitigation options."""
    options = config["strategy"]
    if options.get("share") == "trunk":
        return "hypernetwork trunk only (output heads private)"
    if options.get("head-bias") is False:
        return "hypernetwork, output heads without bias"
    return "hypernetwork (output heads with bias)"


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


def recovered(got: pd.DataFrame, trained: pd.DataFrame, split: bool) -> str:
    """``k / n``: images recovered of those the attacked clients trained on
    (split runs: of the activation rows attacked, ``k``); "-" when the
    attack did not apply."""
    if not len(got):
        return "-"
    if split:
        return str(int(got["value"].sum()))
    n = trained[trained["client"].isin(got["client"])]["value"].sum()
    return f"{int(got['value'].sum())} / {int(n)}"


def rows(run_dir: Path) -> list[dict[str, str]]:
    """The table rows of one run directory: one per attack it ran."""
    config = _config(run_dir)
    split = "split" in config
    frame = analysis.load_runs([run_dir])
    clients = frame[frame["client"].notna()]
    spent = frame[(frame["phase"] == "audit") & (frame["metric"] == "seconds")]
    name = str(config["name"]).rsplit("-b", 1)[0].replace("_", "-")
    batch = int(config["train"]["batch-size"])
    attacks = config["audit"]["attack"]
    attacks = [attacks] if isinstance(attacks, str) else attacks
    trained = clients[(clients["metric"] == "examples") & (clients["phase"] == "train")]
    if split:
        sees = split_sees(config)
    elif name == "audit-hyperfl":
        sees = hyperfl_sees(config)
    else:
        sees = SEES.get(name, "-")
    out = []
    for attack in sorted(attacks, key=ATTACKS.index):
        psnr = clients[clients["metric"] == f"attack-psnr/{attack}"]["value"]
        got = clients[clients["metric"] == f"recovered/{attack}"]
        budget = (
            str(config["audit"]["iterations"])
            if attack.startswith("inverting")
            else "-"
        )
        applies = len(psnr) > 0
        out.append(
            {
                "experiment": f"`{name}`",
                "server sees": sees,
                "batch size": str(batch),
                "local steps": "-"
                if split
                else str(-(-8 // batch) * int(config["train"]["epochs"])),
                "attack": attack,
                "budget": budget,
                "PSNR (dB, one-to-one mean)": f"{psnr.mean():.2f}"
                if applies
                else "not applicable",
                "recovered (> 30 dB)": recovered(got, trained, split),
            }
        )
    if out:
        out[0]["audit s"] = f"{spent['value'].sum():.0f}"
        for r in out[1:]:
            r["audit s"] = ""
    return out


def floors() -> str:
    """What scores carry no information: the mean digit of the global test set
    and uniform noise (8 images, seed 0), each scored like a reconstruction
    against every client's partition of ``audit_fedavg.toml``, mean over
    clients."""
    import numpy as np

    from fedsim.audit.maths import one_to_one
    from fedsim.core.loading import load_experiment
    from fedsim.learn.data import federated_data

    exp = load_experiment(ROOT / "experiments" / "audit_fedavg.toml")
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    rng = np.random.default_rng(0)
    mean, noise = [], []
    for pid in range(exp.federation.clients):
        images = data.client(pid).train.x
        average = np.repeat(data.test.x.mean(0, keepdims=True), len(images), 0)
        mean.append(one_to_one(average, images)[2])
        noise.append(one_to_one(rng.random(images.shape), images)[2])
    return (
        f"floors (one-to-one against each client's training images, mean over "
        f"clients): mean digit {np.mean(np.concatenate(mean)):.2f} dB, "
        f"uniform noise {np.mean(np.concatenate(noise)):.2f} dB"
    )


def figure(dirs: list[Path], path: Path) -> None:
    """The first attacked client's grids of every run and attack, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    grids = [
        (run_dir, grid)
        for run_dir in dirs
        for grid in sorted((run_dir / "attacks").glob("round-*-client-*.png"))[:3]
    ]
    fig, axes = plt.subplots(len(grids), 1, figsize=(4.2, 1.05 * len(grids)))
    for ax, (run_dir, grid) in zip(axes, grids):
        attack = grid.stem.split("-", 4)[-1]
        found = [r for r in rows(run_dir) if r["attack"] == attack]
        r = found[0]
        ax.imshow(imread(grid))
        ax.set_axis_off()
        label = r["server sees"] if r["local steps"] == "-" else r["experiment"]
        ax.set_title(
            f"{label.strip('`')}, batch {r['batch size']}, {attack}: "
            f"{r['PSNR (dB, one-to-one mean)']} dB",
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
    parser.add_argument(
        "--only", nargs="*", default=None, help="experiments or variants to run"
    )
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=BATCH_SIZES)
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into docs/methods/privacy-audit.md (its "
        "split-learning block with --split-only)",
    )
    args = parser.parse_args()
    block = "audit-split" if args.split_only else "audit-table"
    if args.write_docs:
        check_block(PAGE, block)
    if args.read:
        dirs = list(args.read)
    else:
        plan = [(name, name, ()) for name in EXPERIMENTS]
        plan += [(v, name, sets) for v, (name, sets) in VARIANTS.items()]
        if args.split_only:
            plan = []
        if args.only is not None:
            plan = [p for p in plan if p[0] in args.only]
        dirs = []
        for _, name, variant in plan:
            experiment = ROOT / "experiments" / f"audit_{name}.toml"
            for batch in args.batch_sizes:
                sets = [*variant, f"train.batch-size={batch}", *args.overrides]
                dirs.append(run(experiment, sets, args.out))
                print(dirs[-1], file=sys.stderr, flush=True)
        if args.only is None or args.split_only:
            experiment = ROOT / "experiments" / "audit_sfl.toml"
            for split_variant in SPLIT:
                for batch in args.batch_sizes:
                    sets = [
                        *split_variant,
                        f"train.batch-size={batch}",
                        *args.overrides,
                    ]
                    dirs.append(run(experiment, sets, args.out))
                    print(dirs[-1], file=sys.stderr, flush=True)
    table = [r for d in dirs for r in rows(d)]
    text = markdown(
        table, ("experiment", "server sees", "attack", "recovered (> 30 dB)")
    )
    print(text)
    floor = floors()
    print(floor)
    if args.figure:
        figure(dirs, args.figure)
    if args.write_docs:
        if block == "audit-split":
            text = split_markdown(table)
        page = write_block(PAGE, block, f"{text}\n\n{floor[0].upper()}{floor[1:]}.")
        print(f"wrote {page}")
    return 0


PAGE = "methods/privacy-audit.md"
_SAME = ("local steps", "attack", "budget")


def split_markdown(table: list[dict[str, str]]) -> str:
    """The split-learning rows, the columns every row shares (local steps,
    attack, budget) said once above the table."""
    same = {c: sorted({r[c] for r in table}) for c in _SAME}
    head = (
        f"Attack {', '.join(same['attack'])}, budget {', '.join(same['budget'])} "
        "iterations; recovered: reconstructions above 30 dB over the attacked clients."
    )
    kept = [{k: v for k, v in r.items() if k not in _SAME} for r in table]
    return (
        head
        + "\n\n"
        + markdown(kept, ("experiment", "server sees", "recovered (> 30 dB)"))
    )


if __name__ == "__main__":
    sys.exit(main())
