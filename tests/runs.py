"""What the end-to-end tests run through the CLI: ``fedsim run`` and ``fedsim
sweep`` in subprocesses, as a user would, and the experiments that the session's
shared sweeps run (their fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

#: ``RAY_ADDRESS`` of the four-client sweep: a closed loopback port, no cluster.
STRAY_RAY = "127.0.0.1:9"

#: A small, fast federation used by the end-to-end tests.
SMALL = (
    "rounds=3",
    "federation.clients=4",
    "model.name=mlp",
    "train.batch-size=32",
    "federation.fraction-evaluate=0.5",  # seeded sampling in every run
)


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    out: Path
    #: the command line and environment, where a test checks how it ran
    argv: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    #: every process seen under the CLI, and those still alive once it exited
    #: (:func:`sweep_cli` only)
    processes: frozenset[int] = frozenset()
    left_behind: frozenset[int] = frozenset()
    #: (address, port, process name) of every socket a process under the CLI
    #: listened on (TCP) or had bound (UDP) while it ran (:func:`sweep_cli`)
    listening: frozenset[tuple[str, int, str]] = frozenset()

    @property
    def run_dirs(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_dir())

    @property
    def run_dir(self) -> Path:
        (only,) = self.run_dirs
        return only


def fedsim(
    *args: str, out: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> CliRun:
    """Run the ``fedsim`` CLI in a subprocess, as a user would (``env``: the
    environment, default this process's)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", *args, "--out", str(out)]
        if args and args[0] == "run"
        else [sys.executable, "-m", "fedsim", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return CliRun(proc.returncode, proc.stdout, proc.stderr, out)


def sets(*pairs: str) -> list[str]:
    """``--set`` arguments for KEY=VALUE pairs."""
    return [arg for pair in pairs for arg in ("--set", pair)]


def descendants(pid: int) -> set[int]:
    """The processes under ``pid`` now."""
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def listening(pids: set[int]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of the listening TCP and bound UDP
    sockets of ``pids`` now (one look at the whole socket table)."""
    found = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in pids or not conn.laddr:
            continue
        if conn.status == psutil.CONN_LISTEN or (
            conn.type == socket.SOCK_DGRAM and not conn.raddr
        ):
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "?"
            found.add((conn.laddr.ip, conn.laddr.port, name))
    return found


def sweep_cli(
    out: Path,
    experiments: Sequence[Sequence[str]],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> tuple[CliRun, list[Path]]:
    """``fedsim sweep`` of ``experiments``, each the ``KEY=VALUE`` overrides a
    ``fedsim run --set ...`` of it would take: the quickstart as the sweep's base,
    one variant per experiment. Experiments that share ``federation.clients`` and
    ``[resources]`` share one Flower run (start-up paid once). Returns the CLI
    run and each experiment's run directory, in order; asserts that each run
    directory holds the experiment that ``fedsim run`` would have run (its name
    aside), so a test computes its oracle from its overrides as before."""
    import tomli_w

    from fedsim.core.loading import load_experiment, parse_override, to_dict

    out.mkdir(parents=True, exist_ok=True)
    file = out / "experiments.toml"
    variants = [dict(map(parse_override, overrides)) for overrides in experiments]
    base = to_dict(load_experiment(None))
    # The quickstart family's own option keys would be unknown to a variant's
    # family: the base names the family only, each variant sets its options.
    base["strategy"] = {"name": base["strategy"]["name"]}
    file.write_text(tomli_w.dumps({**base, "variants": variants}))
    argv = (
        sys.executable,
        "-m",
        "fedsim",
        "sweep",
        str(file),
        "--out",
        str(out / "runs"),
    )
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    with ThreadPoolExecutor(1) as pool:  # drain the pipes while watching
        streams = pool.submit(proc.communicate, timeout=timeout)
        seen: set[int] = set()
        sockets: set[tuple[str, int, str]] = set()
        looks = 0
        while not streams.done():
            seen |= descendants(proc.pid)
            if looks % 3 == 0:  # every 0.6 s: the sockets' table costs more
                sockets |= listening(alive(seen))
            looks += 1
            time.sleep(0.2)
        try:
            stdout, stderr = streams.result()
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    result = CliRun(
        proc.returncode,
        stdout,
        stderr,
        out,
        argv,
        env,
        processes=frozenset(seen),
        left_behind=frozenset(alive(seen)),  # as soon as the CLI exited
        listening=frozenset(sockets),
    )
    index = out / "runs" / file.stem / "sweep.json"
    assert index.is_file(), result.stdout + result.stderr
    entries = json.loads(index.read_text())["experiments"]
    run_dirs = [index.parent / entry["run_dir"] for entry in entries]
    assert len(run_dirs) == len(experiments)
    for run_dir, overrides in zip(run_dirs, experiments, strict=True):
        alone = load_experiment(None, overrides)
        swept = load_experiment(run_dir / "config.toml")
        assert replace(swept, name=alone.name) == alone, run_dir
    return result, run_dirs


#: The spy plug-ins (``hyperfl-spy``, ``split-ushape-spy``): on PYTHONPATH, their
#: dist-info registers them.
SPY = Path(__file__).parent / "spy"
#: The ``ping`` plug-in family, registered the same way.
PLUGIN = Path(__file__).parent / "plugin"

#: Runs through the CLI and Flower on two clients, one Flower run for all
#: (:func:`two_client_runs`): the spies of HyperFL (tests/test_hyperfl_e2e.py) and
#: of U-shaped split learning (tests/test_split_e2e.py), the ping plug-in
#: (tests/test_families.py), HeteroFL, Pa3dFL and FedProphet on clients of
#: different capacity with PGD robust evaluation (tests/test_capacity_e2e.py),
#: SCAFFOLD and FedAdam (tests/test_baselines_e2e.py).
CAPACITY = (
    "rounds=2",
    "federation.clients=2",
    "model.name=mlp",
    "model.hidden=8",
    "train.epochs=1",
    "train.batch-size=32",
    "robust.epsilon=0.1",
    "robust.steps=2",
)
#: SCAFFOLD and FedAvg + FedAdam (tests/test_baselines_e2e.py).
BASELINES = (
    "rounds=2",
    "federation.clients=2",
    "model.name=mlp",
    "model.hidden=8",
    "train.epochs=1",
    "train.batch-size=32",
    "train.momentum=0",
)
TWO_CLIENTS: dict[str, tuple[str, ...]] = {
    "hyperfl-spy": (
        "strategy.name=hyperfl-spy",
        "rounds=2",
        "federation.clients=2",
        "model.name=mlp",
        "model.hidden=16",
        "train.epochs=1",
    ),
    "ping": (
        "strategy.name=ping",
        "strategy.factor=3",
        "rounds=2",
        "federation.clients=2",
        "federation.fraction-evaluate=0",
        "model.name=mlp",
    ),
    "user-model": (  # a model from the plug-in's fedsim.models entry point
        "rounds=1",
        "federation.clients=2",
        "model.name=ping-linear",
        "federation.fraction-evaluate=0",
    ),
    "split-ushape-spy": (
        "strategy.name=split-ushape-spy",
        "rounds=1",
        "federation.clients=2",
        "data.dataset=synthetic",
        "data.size=200",
        "model.name=mlp",
        "model.hidden=16",
        "train.epochs=1",
        "train.batch-size=32",
        "audit.attack=inverting-activations",
        "audit.clients=2",
        "audit.iterations=5",
    ),
    "heterofl": (
        *CAPACITY,
        "strategy.name=heterofl",
        "strategy.capacities=[1.0, 0.5]",
    ),
    "pa3dfl": (
        *CAPACITY,
        "strategy.name=pa3dfl",
        "strategy.capacities=[1.0, 0.5]",
    ),
    "fedprophet": (
        *CAPACITY,
        "strategy.name=fedprophet",
        "strategy.memory-mb=[0.05, 0.02]",
        "strategy.local-iterations=2",
        "strategy.steps=2",
    ),
    "scaffold": (*BASELINES, "strategy.name=scaffold"),
    "fedadam": (*BASELINES, "strategy.name=fedadam"),
}
#: The key that tells each spy where to write what it sees.
SPY_DIR = {"hyperfl-spy": "strategy.spy-dir", "split-ushape-spy": "split.spy-dir"}


@dataclass(frozen=True)
class SharedRun:
    """One experiment of :func:`two_client_runs` or :func:`four_client_runs`."""

    run_dir: Path
    #: the sweep that ran it (processes, exit status)
    sweep: CliRun
    #: what the spy saw (spies only)
    seen: Path | None = None
    #: the run's FEDSIM_CACHE (four_client_runs)
    cache: Path | None = None


def console_script_env() -> tuple[Path, dict[str, str]]:
    """The ``fedsim`` console script of this environment, and this process's
    environment as a shell where that environment is not activated has it: its
    ``bin/`` not on ``PATH``, no ``VIRTUAL_ENV``."""
    script = Path(sys.executable).with_name("fedsim")
    here = str(script.parent)
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != here
    )
    env = {**os.environ, "PATH": path or "/usr/bin:/bin"}
    env.pop("VIRTUAL_ENV", None)
    return script, env
