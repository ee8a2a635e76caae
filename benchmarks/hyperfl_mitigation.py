"""What HyperFL's mitigations of the analytic attack cost in accuracy: HyperFL as
the reference builds it, its output heads without bias (``strategy.head-bias =
false``) and its output heads private (``strategy.share = "trunk"``), each over
several seeds on ``experiments/hyperfl_digits.toml``.

Usage::

    python benchmarks/hyperfl_mitigation.py [--out DIR] [--seeds 0 1 2]
        [--set KEY=VALUE ...]
    python benchmarks/hyperfl_mitigation.py --read RUN_DIR ...

``--write-docs`` also writes the table into ``docs/methods/hyperfl.md`` (block
``hyperfl-mitigation``, :mod:`pages`).

Runs each variant once per seed with ``fedsim run`` as a user would, reads the
run directories with :mod:`fedsim.analysis` and prints a Markdown table of the
last round's personalised accuracy (example-weighted mean over the clients, and
the worst client) as mean ± standard deviation over the seeds (``ddof = 1``),
and the bytes one client uploads per training exchange. ``--set`` applies to
every run (``--set rounds=10``). Whether each variant leaks is the audit
table's (``benchmarks/audit_table.py``).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import numpy as np
from cli_run import markdown, run, table_parser
from pages import check_block, write_block

from fedsim import analysis

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "hyperfl_digits.toml"
#: Variant -> overrides.
VARIANTS: dict[str, tuple[str, ...]] = {
    "hyperfl (reference: heads with bias, all shared)": (),
    "head-bias = false": ("strategy.head-bias=false",),
    "share = trunk (private output heads)": ("strategy.share=trunk",),
}


def variant_of(run_dir: Path) -> str:
    """The variant a run directory belongs to, from its resolved config."""
    config = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    strategy = config["strategy"]
    if strategy.get("share") == "trunk":
        return "share = trunk (private output heads)"
    if strategy.get("head-bias") is False:
        return "head-bias = false"
    return "hyperfl (reference: heads with bias, all shared)"


def last_round(run_dir: Path) -> tuple[float, float, float]:
    """(mean accuracy, worst client's accuracy, bytes up per client) of the
    last round."""
    frame = analysis.load_runs([run_dir])
    last = int(frame["round"].max())
    clients = analysis.client_metric(frame, "accuracy", "evaluate")
    final = clients[clients["round"] == last]["value"]
    headline = analysis.round_metric(frame, "accuracy", "evaluate")
    rows = frame[frame["client"].notna() & (frame["phase"] == "train")]
    up = rows[(rows["metric"] == "bytes-up") & (rows["round"] == last)]["value"]
    return float(headline.iloc[-1, -1]), float(final.min()), float(up.mean())


def table(dirs: list[Path]) -> str:
    """mean ± std over the seeds, per variant."""
    by: dict[str, list[tuple[float, float, float]]] = {}
    for d in dirs:
        by.setdefault(variant_of(d), []).append(last_round(d))
    out = []
    for name, values in by.items():
        mean, worst, up = (np.array(v) for v in zip(*values))
        out.append(
            {
                "variant": name,
                "seeds": str(len(values)),
                "accuracy (mean over clients)": f"{mean.mean():.4f} ± "
                f"{mean.std(ddof=1) if len(mean) > 1 else 0:.4f}",
                "accuracy (worst client)": f"{worst.mean():.4f} ± "
                f"{worst.std(ddof=1) if len(worst) > 1 else 0:.4f}",
                "up per client": f"{up.mean() / 1e3:.1f} kB",
            }
        )
    return markdown(out, ("variant",))


def main() -> int:
    parser = table_parser(__doc__, "runs/hyperfl-mitigation")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into its docs page",
    )
    args = parser.parse_args()
    if args.write_docs:
        check_block("methods/hyperfl.md", "hyperfl-mitigation")
    if args.read:
        dirs = list(args.read)
    else:
        dirs = []
        for sets in VARIANTS.values():
            for seed in args.seeds:
                overrides = [*sets, f"seed={seed}", *args.overrides]
                dirs.append(run(EXPERIMENT, overrides, args.out))
                print(dirs[-1], file=sys.stderr, flush=True)
    text = table(dirs)
    print(text)
    if args.write_docs:
        page = write_block("methods/hyperfl.md", "hyperfl-mitigation", text)
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
