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

    python benchmarks/data_scale.py memory [--rows 127.5 1275] [--reuse]
    python benchmarks/data_scale.py femnist [--writers 3500] [--rows 226] [--reuse]
    python benchmarks/data_scale.py baseline --old-tree DIR [--writers 350 --rows 100]

``memory``: one run per dataset size with a cold cache (the CLI's pre-run check
builds the memory-mapped cache entry) and 10 clients sampled per round; by
default 1,000 writers with 127.5 and 1,275 rows on average: 0.4 and 4 GB of
float32 features.
``femnist``: one client per writer, 100 sampled per round, 3 rounds; the time
to the first round with a cold cache (the first run builds the entry) and a
warm one (``--cache``: a cache an earlier run filled), and per round.
Each ``memory`` measurement is saved as ``SCRATCH/memory-<writers>x<rows>.json``
and each ``femnist`` pair of runs as ``SCRATCH/timing-<writers>x<rows>.json``;
``--reuse`` tabulates a saved one instead of measuring again (sizes measured
one at a time, then written together with ``--write-docs``).
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
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

PAGE = "how-to/datasets.md"
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


def _role(proc: psutil.Process, root: psutil.Process) -> str:
    """What a process of the run is: the CLI host, a Ray actor (a client
    worker), or the name of its program (Flower's SuperLink and simulation,
    which hosts the ServerApp, Ray's raylet, GCS, dashboard, ...)."""
    if proc.pid == root.pid:
        return "cli-host"
    try:
        argv = proc.cmdline()
        name = proc.name()
    except psutil.Error:
        return "gone"
    line = " ".join(argv)
    if "ClientAppActor" in line or "default_worker.py" in line:
        return "actor"
    if argv and "python" in Path(argv[0]).name:  # the script or module it runs
        argv = [a for a in argv[1:] if a not in ("-u", "-m")]
    return Path(argv[0]).name[:32] if argv else name


def measure(file: Path, cache: Path, old_tree: str = "") -> dict[str, Any]:
    """Run ``fedsim run file``; PSS peaks and the time of each closed round.

    Each second: the PSS of every process under the CLI host. Reported: the
    peak of their sum, the peak of the actors' sum, the largest single
    actor's peak, the time of that peak, and what each role held at the
    peak of the sum (where the memory goes)."""
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
    peak = peak_actors = peak_actor = 0
    at_peak: dict[str, int] = {}
    peak_s = 0.0
    while host.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        sizes = [(_pss(p), _role(p, root)) for p in procs]
        actors = [size for size, role in sizes if role == "actor"]
        peak_actors = max(peak_actors, sum(actors))
        peak_actor = max([peak_actor, *actors])
        if sum(s for s, _ in sizes) > peak:
            peak = sum(s for s, _ in sizes)
            peak_s = time.monotonic() - started
            at_peak = {}
            for size, role in sizes:
                at_peak[role] = at_peak.get(role, 0) + size
        time.sleep(1.0)
    reader.join(timeout=10)
    if host.returncode != 0:
        raise RuntimeError("run failed:\n" + "".join(lines[-30:]))
    return {
        "peak_pss_gb": peak / 1e9,
        "peak_actors_pss_gb": peak_actors / 1e9,
        "peak_one_actor_pss_gb": peak_actor / 1e9,
        "peak_at_s": peak_s,
        "at_peak_gb": {
            k: v / 1e9 for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])
        },
        "wall_s": time.monotonic() - started,
        "round_s": rounds,  # round -> seconds from launch (0: initial evaluation)
    }


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    old = args.mode == "baseline"
    for writers in args.writers:
        for rows in args.rows:
            saved = SCRATCH / f"{args.mode}-{writers}x{rows:g}.json"
            if args.reuse and saved.is_file():
                results.append(json.loads(saved.read_text()))
                print(f"reused {saved}", flush=True)
                continue
            folder, images = dataset(writers, rows)
            file = experiment(folder, writers, sampled=10, rounds=2, old=old)
            cache = Path(tempfile.mkdtemp(prefix="cache-", dir=SCRATCH))
            got = measure(file, cache, args.old_tree if old else "")
            shutil.rmtree(cache, ignore_errors=True)
            if old:  # it trains on the train split only: its size is what it holds
                import datasets

                images = len(datasets.load_from_disk(str(folder))["train"])
            size = images * FEATURE_BYTES / 1e9
            got |= {
                "writers": writers,
                "rows": rows,
                "images": images,
                "dataset_gb": size,
            }
            got["peak_over_dataset"] = got["peak_pss_gb"] / size
            saved.write_text(json.dumps(got, indent=1))
            print(json.dumps(got), flush=True)
            results.append(got)
    return results


def femnist(args: argparse.Namespace) -> list[dict[str, Any]]:
    (writers,) = args.writers
    (rows,) = args.rows
    saved = SCRATCH / f"timing-{writers}x{rows:g}.json"
    if args.reuse and saved.is_file():
        print(f"reused {saved}", flush=True)
        return json.loads(saved.read_text())  # type: ignore[no-any-return]
    folder, images = dataset(writers, rows)
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
            "rows": rows,
            "images": images,
            "dataset_gb": images * FEATURE_BYTES / 1e9,
            "round0_s": at[0],
            "first_round_s": at[1],
            "per_round_s": [at[r] - at[r - 1] for r in sorted(at) if r >= 2],
        }
        print(json.dumps(got), flush=True)
        results.append(got)
    saved.write_text(json.dumps(results, indent=1))
    return results


def _where(got: dict[str, Any]) -> str:
    parts = list(got["at_peak_gb"].items())[:4]
    return ", ".join(f"{role} {gb:.2f}" for role, gb in parts)


def memory_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| dataset (float32, train + test) | writers x rows "
        "| peak PSS, all processes | ratio to the dataset | peak PSS, both actors "
        "| peak PSS, one actor | at the peak (GB) |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = []
    for g in results:
        size = f"{g['dataset_gb']:.2f} GB ({g['images']:,} images)"
        shape = f"{g['writers']:,} x {g['rows']:g}"
        peaks = (
            f"{g['peak_pss_gb']:.2f} GB | {g['peak_over_dataset']:.2f}x "
            f"| {g['peak_actors_pss_gb']:.2f} GB | {g['peak_one_actor_pss_gb']:.2f} GB"
        )
        rows.append(f"| {size} | {shape} | {peaks} | {_where(g)} |")
    return "\n".join([head, *rows])


def femnist_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| cache | images (writers x mean rows) | round 0 closed (server evaluation) "
        "| time to the first round | per round (rounds 2, 3) "
        "| peak PSS, all (ratio) / one actor | at the peak (GB) |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = []
    for g in results:
        size = (
            f"{g['images']:,} ({g['writers']:,} x {g['rows']:g}; "
            f"{g['dataset_gb']:.2f} GB)"
        )
        times = (
            f"{g['round0_s']:.0f} s | {g['first_round_s']:.0f} s "
            f"| {', '.join(f'{s:.0f} s' for s in g['per_round_s'])}"
        )
        ratio = g["peak_pss_gb"] / g["dataset_gb"]
        peaks = (
            f"{g['peak_pss_gb']:.2f} GB ({ratio:.2f}x) "
            f"/ {g['peak_one_actor_pss_gb']:.2f} GB"
        )
        rows.append(f"| {g['cache']} | {size} | {times} | {peaks} | {_where(g)} |")
    return "\n".join([head, *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("memory", "femnist", "baseline"))
    parser.add_argument("--old-tree", default="", help="baseline: earlier fedsim")
    parser.add_argument("--cache", type=Path, help="femnist: FEDSIM_CACHE to use")
    parser.add_argument("--repeat", type=int, default=2, help="femnist: runs")
    parser.add_argument("--writers", type=int, nargs="+")
    parser.add_argument("--rows", type=float, nargs="+", help="mean rows per writer")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take a measurement from its saved JSON (SCRATCH/memory-WxR.json, "
        "SCRATCH/timing-WxR.json) when there is one",
    )
    parser.add_argument(
        "--write-docs", action="store_true", help=f"write the table into docs/{PAGE}"
    )
    args = parser.parse_args()
    if args.writers is None:
        args.writers = {"memory": [1000], "femnist": [3500]}.get(args.mode, [1000])
    if args.rows is None:
        args.rows = {"memory": [127.5, 1275.0], "femnist": [226.0]}.get(
            args.mode, [127.5]
        )
    SCRATCH.mkdir(parents=True, exist_ok=True)
    results = femnist(args) if args.mode == "femnist" else memory(args)
    out = SCRATCH / f"{args.mode}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    table = femnist_table(results) if args.mode == "femnist" else memory_table(results)
    print(table)
    if args.write_docs and args.mode != "baseline":
        from pages import write_block

        block = {"memory": "data-scale-memory", "femnist": "data-scale-femnist"}
        write_block(PAGE, block[args.mode], table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
