"""Memory and time of runs on FEMNIST-shaped data (fedsim.learn.femnist_like).

Generates FEMNIST-shaped datasets (``save_to_disk`` folders: an Image column,
62 classes, writer ids with skewed counts, splits train/test) and runs
``fedsim run`` on them, partitioned by writer (``natural-id``), with Ray's two
actors (2 cores, 1 CPU per client). While a run goes, it samples the
proportional set size (PSS, /proc/PID/smaps_rollup via psutil) of every process
of the run (the CLI host and everything below it: Flower's SuperLink and
simulation, Ray's processes and actors) every second and reports the peak
of the sum, the peak of the actors' sum, the time from launch to each closed
round, and the dataset's size (its float32 features, train + test, the size of
the arrays every process used to load whole).

    python benchmarks/data_scale.py memory [--writers 350 3500] [--rows 100]
    python benchmarks/data_scale.py femnist [--writers 3500] [--rows 100]
    python benchmarks/data_scale.py baseline --old-tree DIR [--writers 350]

``memory``: one run per dataset size with a cold cache (the CLI's pre-run check
builds the memory-mapped cache entry) and 10 clients sampled per round.
``femnist``: one client per writer, 100 sampled per round, 3 rounds; the time
to the first round with a cold cache (the first run builds the entry) and a
warm one (``--cache``: a cache an earlier run filled), and per round.
``baseline``: the ``memory`` run with an earlier fedsim (``--old-tree``: a
checkout of it, e.g. ``git archive 35053c0 | tar -x -C DIR``, put first on
``PYTHONPATH``) that loads the whole ``.npz`` cache in every process; it reads
the train split exported to Parquet (``hf:parquet``, which it can load) with
IID partitions (it has no natural-id) and carves its own test set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

SCRATCH = Path(os.environ.get("FEDSIM_BENCH_SCRATCH", "/tmp/fedsim-data-scale"))
FEATURE_BYTES = 28 * 28 * 4


def dataset(writers: int, rows: float) -> tuple[Path, int]:
    """The generated folder (made once) and its number of images."""
    import datasets

    from fedsim.learn import femnist_like

    folder = SCRATCH / f"femnist-{writers}x{rows:g}"
    if not (folder / "dataset_dict.json").is_file():
        started = time.monotonic()
        femnist_like.write(folder, writers=writers, mean_rows=rows)
        print(f"generated {folder} in {time.monotonic() - started:.0f}s", flush=True)
    saved = datasets.load_from_disk(str(folder))
    return folder, sum(len(s) for s in saved.values())


def experiment(
    folder: Path, writers: int, sampled: int, rounds: int, old: bool = False
) -> Path:
    data = f"""dataset = "hf:{folder}"
label-column = "character"
partitioner = "natural-id"
partition-by = "writer_id"
test-split = "test"
"""
    if old:
        parquet = folder.with_suffix(".parquet")
        if not parquet.is_file():
            import datasets

            datasets.load_from_disk(str(folder))["train"].to_parquet(str(parquet))
        data = f"""dataset = "hf:parquet"
path = "{parquet}"
label-column = "character"
partitioner = "iid"
"""
    text = f"""name = "femnist-like"
seed = 0
rounds = {rounds}

[federation]
clients = {writers}
fraction-train = {sampled / writers!r}
fraction-evaluate = {sampled / writers!r}

[data]
{data}
[model]
name = "cnn"

[train]
epochs = 1
batch-size = 32
lr = 0.05
"""
    file = Path(tempfile.mkdtemp(prefix="exp-", dir=SCRATCH)) / "experiment.toml"
    file.write_text(text)
    return file


def _pss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.Error, OSError):
        return 0


def _is_actor(proc: psutil.Process) -> bool:
    try:
        line = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "ClientAppActor" in line or "default_worker.py" in line


def measure(file: Path, cache: Path, old_tree: str = "") -> dict[str, Any]:
    """Run ``fedsim run file``; PSS peaks and the time of each closed round."""
    env = {**os.environ, "FEDSIM_CACHE": str(cache)}
    if old_tree:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [old_tree, env.get("PYTHONPATH")])
        )
    out = Path(tempfile.mkdtemp(prefix="runs-", dir=SCRATCH))
    started = time.monotonic()
    cmd = ["nice", "-n", "10", sys.executable, "-m", "fedsim", "run", str(file)]
    host = subprocess.Popen(
        [*cmd, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rounds: dict[int, float] = {}
    lines: list[str] = []

    def read() -> None:
        assert host.stdout is not None
        for line in host.stdout:
            lines.append(line)
            words = line.split()
            if len(words) > 1 and words[0] == "round":  # "round   1/3  accuracy ..."
                rounds[int(words[1].split("/")[0])] = time.monotonic() - started

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    root = psutil.Process(host.pid)
    peak = peak_actors = 0
    while host.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        sizes = [(_pss(p), _is_actor(p)) for p in procs]
        peak = max(peak, sum(s for s, _ in sizes))
        peak_actors = max(peak_actors, sum(s for s, actor in sizes if actor))
        time.sleep(1.0)
    reader.join(timeout=10)
    if host.returncode != 0:
        raise RuntimeError("run failed:\n" + "".join(lines[-30:]))
    return {
        "peak_pss_gb": peak / 1e9,
        "peak_actors_pss_gb": peak_actors / 1e9,
        "wall_s": time.monotonic() - started,
        "round_s": rounds,  # round -> seconds from launch (0: initial evaluation)
    }


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    old = args.mode == "baseline"
    for writers in args.writers:
        folder, images = dataset(writers, args.rows)
        file = experiment(folder, writers, sampled=10, rounds=2, old=old)
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=SCRATCH))
        got = measure(file, cache, args.old_tree if old else "")
        if old:  # it trains on the train split only: its size is what it holds
            import datasets

            images = len(datasets.load_from_disk(str(folder))["train"])
        size = images * FEATURE_BYTES / 1e9
        got |= {"writers": writers, "images": images, "dataset_gb": size}
        got["peak_over_dataset"] = got["peak_pss_gb"] / size
        print(json.dumps(got), flush=True)
        results.append(got)
    return results


def femnist(args: argparse.Namespace) -> list[dict[str, Any]]:
    (writers,) = args.writers
    folder, images = dataset(writers, args.rows)
    file = experiment(folder, writers, sampled=100, rounds=3)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="cache-", dir=SCRATCH))
    results = []
    for _ in range(args.repeat):
        state = "warm" if any((cache / "data").glob("*/meta.json")) else "cold"
        got = measure(file, cache)
        at = got["round_s"]
        got |= {
            "cache": state,
            "writers": writers,
            "images": images,
            "first_round_s": at[1],
            "per_round_s": [at[r] - at[r - 1] for r in sorted(at) if r >= 2],
        }
        print(json.dumps(got), flush=True)
        results.append(got)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("memory", "femnist", "baseline"))
    parser.add_argument("--old-tree", default="", help="baseline: earlier fedsim")
    parser.add_argument("--cache", type=Path, help="femnist: FEDSIM_CACHE to use")
    parser.add_argument("--repeat", type=int, default=2, help="femnist: runs")
    parser.add_argument("--writers", type=int, nargs="+")
    parser.add_argument("--rows", type=float, default=100.0, help="mean per writer")
    args = parser.parse_args()
    if args.writers is None:
        args.writers = {"memory": [350, 3500], "femnist": [3500]}.get(args.mode, [350])
    SCRATCH.mkdir(parents=True, exist_ok=True)
    results = femnist(args) if args.mode == "femnist" else memory(args)
    out = SCRATCH / f"{args.mode}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
