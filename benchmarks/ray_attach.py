"""Attach overhead: seconds from ``fedsim run`` to round 1, local vs attached.

Usage::

    python benchmarks/ray_attach.py [--repeats N] [--out DIR]

Starts the two-node Ray cluster of ``tests/test_ray_cluster.py`` on this host
(head and worker, 1 CPU each, loopback address, their own temp dir; stopped at
the end), then runs the same 1-round, 4-client FedAvg experiment ``N`` times
(default 3) each way, alternating: with its own local Ray, and attached with
``--ray-address``. For each run it notes the seconds from starting the CLI
to the line of round 1 (``round   1/1``) and the clients each Ray node served
(``summary.json``'s ``placement``), then mean ± std per mode. Run directories
go to ``DIR`` (default a temporary folder). ``--write-docs`` also writes the
table into ``docs/how-to/ray-cluster.md`` (block ``ray-attach``, :mod:`pages`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_ray_cluster import two_node_cluster  # noqa: E402

EXPERIMENT = (
    "rounds=1",
    "federation.clients=4",
    "data.dataset=synthetic",
    "data.size=200",
    "model.name=mlp",
    "model.hidden=8",
)


def to_round_one(args: list[str], out: Path) -> tuple[float, Path]:
    """Seconds from starting ``fedsim run ARGS`` to its round-1 line, and the
    run directory."""
    sets = [a for kv in EXPERIMENT for a in ("--set", kv)]
    argv = [sys.executable, "-m", "fedsim", "run", *args, *sets, "--out", str(out)]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    seconds = None
    for line in proc.stdout:
        if seconds is None and line.startswith("round   1/"):
            seconds = time.monotonic() - started
    assert proc.wait() == 0 and seconds is not None, argv
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return seconds, run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into its docs page",
    )
    opts = parser.parse_args()
    if opts.write_docs:
        from pages import check_block

        check_block("how-to/ray-cluster.md", "ray-attach")
    out = opts.out or Path(tempfile.mkdtemp(prefix="ray-attach-"))
    times: dict[str, list[float]] = {"local": [], "attached": []}
    with two_node_cluster() as (address, _):
        for i in range(opts.repeats):
            for mode in times:
                args = ["--ray-address", address] if mode == "attached" else []
                seconds, run_dir = to_round_one(args, out / f"{mode}-{i}")
                times[mode].append(seconds)
                summary = json.loads((run_dir / "summary.json").read_text())
                served = summary["placement"]["rounds"]["1"]["train"]
                print(
                    f"{mode:>8} run {i}: {seconds:5.1f} s to round 1; "
                    f"clients per node {sorted(served.values())}",
                    flush=True,
                )
    lines = ["| run | seconds to round 1, each run | mean ± std |", "|---|---|---|"]
    for mode, values in times.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        each = ", ".join(f"{v:.1f}" for v in values)
        lines.append(
            f"| {mode} | {each} | {statistics.mean(values):.1f} ± {spread:.1f} |"
        )
    print("\n".join(lines))
    if opts.write_docs:
        from pages import write_block

        page = write_block("how-to/ray-cluster.md", "ray-attach", "\n".join(lines))
        print(f"wrote {page}")


if __name__ == "__main__":
    main()
