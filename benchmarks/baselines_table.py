"""The baselines table of the docs: FedAvg, FedProx, SCAFFOLD, FedAdam,
FedYogi and FedAvgM on digits with Dirichlet(0.1) label skew, 20 clients, 30 %
of them training each round.

Usage::

    python benchmarks/baselines_table.py [--out DIR] [--rounds N] [--seeds N]
    python benchmarks/baselines_table.py --read DIR

Two ``fedsim sweep`` runs, as a user would run them:

1. *Tuning*: each method's key hyper-parameter over a small grid (FedProx
   ``strategy.proximal-mu``, SCAFFOLD ``strategy.server-lr``, FedAdam and
   FedYogi ``strategy.server-lr``, FedAvgM ``strategy.server-momentum``) on
   a tuning seed (``seed = 100``: another partition, initialisation and
   sampling than the seeds reported); the value with the best mean
   server-side accuracy over the last five rounds is kept.
2. *Comparison*: each method with its tuned value on seeds ``0 .. N-1``.

Everything else is shared: the mlp (hidden 64), ``train.epochs = 2``,
``batch-size = 16``, local SGD at ``lr = 0.05`` without momentum (SCAFFOLD's
option II needs plain SGD; the others get the same local optimiser),
FedAvg's example-weighted mean (SCAFFOLD: the paper's uniform mean).
Accuracy is the global model's on the held-out test set after each round
(``server`` phase). The table: final (last round) and best (max over rounds)
accuracy, mean ± sample standard deviation over the seeds. Run directories
go to ``DIR/tune`` and ``DIR/compare`` (default ``runs/baselines-table``);
``--read DIR`` tabulates those without running. ``--write-docs`` also writes
both tables into ``docs/methods/baselines.md`` (:mod:`pages`) and draws the
comparison's learning curves (mean ± std over the seeds per round) into
``docs/img/baselines-curves.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tomli_w
from cli_run import markdown
from pages import DOCS, check_block, write_block

from fedsim import analysis

BASE = {
    "name": "baselines",
    "federation": {"clients": 20, "fraction-train": 0.3, "fraction-evaluate": 0.0},
    "data": {"dataset": "digits", "partitioner": "dirichlet", "alpha": 0.1},
    "model": {"name": "mlp", "hidden": 64},
    "train": {"epochs": 2, "batch-size": 16, "lr": 0.05, "momentum": 0.0},
}
#: method -> (fixed overrides, tuned key, grid).
METHODS: dict[str, tuple[dict[str, object], str, list[float]]] = {
    "FedAvg": (
        {"strategy.name": "fedavg"},
        "",
        [],
    ),
    "FedProx": (
        {"strategy.name": "fedprox"},
        "strategy.proximal-mu",
        [0.001, 0.01, 0.1, 1.0],
    ),
    "SCAFFOLD": ({"strategy.name": "scaffold"}, "strategy.server-lr", [0.5, 1.0]),
    "FedAdam": (
        {"strategy.name": "fedadam"},
        "strategy.server-lr",
        [0.003, 0.01, 0.03, 0.1, 0.3],
    ),
    "FedYogi": (
        {"strategy.name": "fedyogi"},
        "strategy.server-lr",
        [0.003, 0.01, 0.03, 0.1, 0.3],
    ),
    "FedAvgM": (
        {"strategy.name": "fedavgm"},
        "strategy.server-momentum",
        [0.5, 0.7, 0.9],
    ),
}
TUNING_SEED = 100


def variants(tuned: dict[str, float] | None) -> list[tuple[str, dict[str, object]]]:
    """(method, overrides) per experiment: the whole grid, or the tuned values."""
    out = []
    for method, (fixed, key, grid) in METHODS.items():
        if not key:
            out.append((method, dict(fixed)))
            continue
        for v in grid if tuned is None else [tuned[method]]:
            out.append((method, {**fixed, key: v}))
    return out


def sweep(
    path: Path, rounds: int, seeds: list[int], chosen: list[tuple[str, dict]]
) -> list[Path]:
    """Write the sweep file, run ``fedsim sweep``, return the run directories in
    the order of (seed, variant)."""
    spec = {
        **BASE,
        "rounds": rounds,
        "grid": {"seed": seeds},
        "variants": [v for _, v in chosen],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(spec))
    cmd = [
        sys.executable,
        "-m",
        "fedsim",
        "sweep",
        str(path),
        "--out",
        str(path.parent),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fedsim sweep failed:\n{proc.stdout}\n{proc.stderr}")
    return runs_of(path.parent / path.stem)


def runs_of(sweep_dir: Path) -> list[Path]:
    """The run directories of a sweep, in its order."""
    record = json.loads((sweep_dir / "sweep.json").read_text())
    return [sweep_dir / e["run_dir"] for e in record["experiments"]]


def accuracy(run_dir: Path) -> np.ndarray:
    """Server-side accuracy per round (rounds >= 1)."""
    frame = analysis.load_runs([run_dir])
    series = analysis.round_metric(frame, "accuracy", "server").iloc[:, 0]
    return series[series.index >= 1].to_numpy()


def method_of(run_dir: Path) -> tuple[str, float | None]:
    """(method, tuned value) from the run's resolved config."""
    import tomllib

    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    strategy = cfg["strategy"]
    for method, (fixed, key, _) in METHODS.items():
        if all(_get(cfg, k) == v for k, v in fixed.items()):
            return method, (_get(cfg, key) if key else None)
    raise ValueError(f"{run_dir}: no method matches {strategy}")


def _get(cfg: dict, dotted: str) -> object:
    section, _, key = dotted.partition(".")
    return cfg.get(section, {}).get(key)


def choose(run_dirs: list[Path]) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Each method's value with the best mean accuracy over the last 5 rounds."""
    scores: dict[str, dict[float, float]] = {}
    for d in run_dirs:
        method, value = method_of(d)
        scores.setdefault(method, {})[value if value is not None else 0.0] = float(
            accuracy(d)[-5:].mean()
        )
    tuned = {m: max(s, key=s.__getitem__) for m, s in scores.items()}
    rows = [
        {
            "method": m,
            "key": f"`{METHODS[m][1].split('.')[-1]}`" if METHODS[m][1] else "-",
            f"grid (last-5 accuracy, seed {TUNING_SEED})": ", ".join(
                f"{v:g}: {a:.3f}" if METHODS[m][1] else f"untuned: {a:.3f}"
                for v, a in s.items()
            ),
            "chosen": f"{tuned[m]:g}" if METHODS[m][1] else "-",
        }
        for m, s in scores.items()
    ]
    return tuned, rows


def compare(run_dirs: list[Path]) -> list[dict[str, str]]:
    """Final and best accuracy per method, mean ± std over seeds."""
    per: dict[str, list[np.ndarray]] = {}
    value: dict[str, float | None] = {}
    for d in run_dirs:
        method, v = method_of(d)
        per.setdefault(method, []).append(accuracy(d))
        value[method] = v
    rows = []
    for method in METHODS:
        if method not in per:
            continue
        curves = per[method]
        final = np.array([c[-1] for c in curves])
        best = np.array([c.max() for c in curves])
        key = METHODS[method][1]
        rows.append(
            {
                "method": method,
                "setting": f"`{key.split('.')[-1]} = {value[method]:g}`"
                if key
                else "-",
                "seeds": str(len(curves)),
                "final accuracy": f"{final.mean():.3f} ± {final.std(ddof=1):.3f}",
                "best accuracy": f"{best.mean():.3f} ± {best.std(ddof=1):.3f}",
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/baselines-table"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--read", type=Path, help="tabulate this folder only")
    parser.add_argument("--write-docs", action="store_true", help="write the docs page")
    args = parser.parse_args()
    if args.write_docs:
        check_block(PAGE, "baselines-tuning")
        check_block(PAGE, "baselines-compare")
    if args.read is not None:
        tune_runs = runs_of(args.read / "tune")
        compare_runs = runs_of(args.read / "compare")
    else:
        tune_runs = sweep(
            args.out / "tune.toml", args.rounds, [TUNING_SEED], variants(None)
        )
    tuned, tuning_rows = choose(tune_runs)
    tuning = markdown(
        tuning_rows,
        ("method", "key", f"grid (last-5 accuracy, seed {TUNING_SEED})", "chosen"),
    )
    print(tuning)
    if args.read is None:
        compare_runs = sweep(
            args.out / "compare.toml",
            args.rounds,
            list(range(args.seeds)),
            variants(tuned),
        )
    print()
    comparison = markdown(compare(compare_runs), ("method", "setting"))
    print(comparison)
    if args.write_docs:
        write_block(PAGE, "baselines-tuning", tuning)
        write_block(PAGE, "baselines-compare", comparison)
        print(f"wrote {PAGE} and {curves(compare_runs, FIGURE)}")
    return 0


PAGE = "methods/baselines.md"
FIGURE = DOCS / "img" / "baselines-curves.png"


def curves(run_dirs: list[Path], path: Path) -> Path:
    """The comparison's learning curves: server accuracy per round, mean over
    the seeds with a ± std band, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per: dict[str, list[np.ndarray]] = {}
    for d in run_dirs:
        per.setdefault(method_of(d)[0], []).append(accuracy(d))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for method in METHODS:
        if method not in per:
            continue
        stack = np.stack(per[method])
        mean, std = (
            stack.mean(0),
            stack.std(0, ddof=1) if len(stack) > 1 else 0 * stack[0],
        )
        rounds = np.arange(1, len(mean) + 1)
        ax.plot(rounds, mean, label=f"{method} ({len(stack)} seeds)")
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("server test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("digits, Dirichlet(0.1), 20 clients, 6 per round: mean ± std")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
