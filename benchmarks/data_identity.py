"""Every packaged experiment gets the same data from the memory-mapped cache as
from the in-memory build of an earlier revision (the ``.npz`` era).

For each ``experiments/*.toml`` (a sweep's variants included) and each
pre-training split an experiment uses, it builds the federation's data with
the earlier revision's ``fedsim/learn/data.py`` (taken from git, run on this
checkout's loaders' unchanged code) and with this checkout's
:func:`fedsim.learn.data.federated_data` (written to a scratch cache, then read
back memory-mapped), and compares dtype, shape, strides and bytes of the pool,
the global test set, every partition and every client's train/test split.
Identical inputs give identical metrics: training only reads these arrays.

    python benchmarks/data_identity.py [--base REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def old_module(rev: str, folder: Path) -> Any:
    source = subprocess.run(
        ["git", "show", f"{rev}:fedsim/learn/data.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "old_data.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_data", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_data"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.strides == b.strides
        and a.tobytes() == b.tobytes()
    )


def compare(old: Any, new: Any) -> list[str]:
    bad = []
    if (old.info.input_shape, old.info.num_classes) != (
        new.info.input_shape,
        new.info.num_classes,
    ):
        bad.append("info")
    for name in ("pool", "test"):
        for field in ("x", "y"):
            got = getattr(getattr(new, name), field)
            if not same(getattr(getattr(old, name), field), got):
                bad.append(f"{name}.{field}")
    if len(old.partitions) != len(new.partitions):
        return bad + ["partition count"]
    for pid, (a, b) in enumerate(zip(old.partitions, new.partitions, strict=True)):
        if not same(a, b):
            bad.append(f"partition {pid}")
        co, cn = old.client(pid), new.client(pid)
        for split in ("train", "test"):
            for field in ("x", "y"):
                got = getattr(getattr(cn, split), field)
                if not same(getattr(getattr(co, split), field), got):
                    bad.append(f"client {pid} {split}.{field}")
    return bad


def experiments() -> list[tuple[str, Any]]:
    from fedsim.core.loading import load_experiment
    from fedsim.core.sweeps import load_sweep

    found = []
    for file in sorted((ROOT / "experiments").glob("*.toml")):
        try:
            found.append((file.name, load_experiment(file)))
        except Exception:  # a sweep file
            for point in load_sweep(file):
                found.append((f"{file.name}[{point.index}]", point.experiment))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="35053c0", help="the earlier revision")
    args = parser.parse_args()
    from fedsim.core.experiment import DataConfig
    from fedsim.learn import data

    scratch = Path(tempfile.mkdtemp(prefix="fedsim-identity-"))
    os.environ["FEDSIM_CACHE"] = str(scratch / "cache")
    old = old_module(args.base, scratch)
    # the old module's loaders: its own functions (unchanged code), by name
    old.load_arrays = lambda cfg, seed: getattr(old, f"load_{cfg.dataset}")(cfg, seed)
    cases = {}
    for name, exp in experiments():
        cases[(exp.data, exp.federation.clients, exp.seed)] = name
        if exp.model.pretrain:
            public = DataConfig(dataset=exp.model.pretrain)
            cases[(public, 1, exp.seed)] = f"{name} (pre-training split)"
    failed = skipped = 0
    for (cfg, clients, seed), name in cases.items():
        try:
            before = old._split(cfg, clients, seed)
        except Exception as err:  # data the earlier revision cannot read (text rows)
            skipped += 1
            print(f"{name:45s} not comparable: the earlier revision fails: {err}")
            continue
        after = data.federated_data.__wrapped__(cfg, clients, seed)
        mapped = isinstance(after.pool.x, np.memmap)
        bad = compare(before, after)
        failed += bool(bad) or not mapped
        state = "identical" if not bad else "DIFFERS: " + ", ".join(bad[:5])
        print(f"{name:45s} {clients:4d} clients  memmap={mapped}  {state}")
    print(f"{len(cases)} federations, {failed} differ, {skipped} not comparable")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
