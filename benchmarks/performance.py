"""fedsim against a raw PyTorch loop and a plain Flower App on the same workload.

Usage::

    python benchmarks/performance.py [--rounds 20] [--scale]

The workload is the quickstart as a new user runs it (digits, 10 clients with
Dirichlet(0.5) label skew, the CNN, 2 local epochs, Adam lr 0.01, batch size 32,
FedAvg, every client evaluated and the global model tested after every round):

- **raw**: one Python process, the clients trained one after another in a plain
  PyTorch loop (``--part raw``);
- **plain Flower**: ``benchmarks/plain_flower`` (message API, stock ``FedAvg``)
  on a SuperLink in simulation mode with ``flwr run``, as fedsim runs;
- **fedsim**: ``fedsim run`` with ``--set`` overrides.

Each is timed from the command's start to its exit, with the resident memory of
its whole process tree (CLI, SuperLink, simulation process, Ray) sampled every
0.2 s. ``--scale`` adds 1,000 synthetic clients with 100 sampled per round (MLP)
against the same run with 100 clients. One table is printed at the end;
``--write-docs`` also writes it, with the ratios below it, into
``docs/explanations/performance.md`` (block ``performance``, :mod:`pages`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
from cli_run import fedsim_command, markdown
from pages import check_block, write_block

HERE = Path(__file__).resolve().parent
WORKLOAD = ["train.batch-size=32", "train.optimizer=adam", "train.lr=0.01"]
SCALE = [
    "data.dataset=synthetic",
    "data.size=125000",
    "data.features=32",
    "data.classes=10",
    "model.name=mlp",
    "federation.fraction-train=0.1",
    "federation.fraction-evaluate=0",
    "train.epochs=1",
    "train.batch-size=64",
    "rounds=12",
]


#: Process roles by command line, first match wins.
ROLES = (
    ("ClientAppActor", "clients"),
    ("flwr-simulation", "runtime"),
    ("flwr-serverapp", "runtime"),
    ("flower-superlink", "superlink"),
    ("ray", "ray"),
)


def role(proc: psutil.Process) -> str:
    """``clients`` (Ray actors), ``runtime`` (the ServerApp and the simulation
    engine), ``superlink``, ``ray`` (Ray's own daemons) or ``cli``."""
    command = " ".join(proc.cmdline())
    return next((name for key, name in ROLES if key in command), "cli")


class Sampler:
    """Peak summed RSS of a process and all its descendants, and the CPU
    seconds each role used (the last sample of each process, every 0.2 s)."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = 0
        self.cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in procs:
                with suppress(psutil.Error):
                    total += proc.memory_info().rss
                    times = proc.cpu_times()
                    # a Ray worker is ``ray::IDLE`` until it becomes an actor
                    seen = self.cpu.get(proc.pid, ("", 0.0))[0]
                    name = "clients" if seen == "clients" else role(proc)
                    self.cpu[proc.pid] = (name, times.user + times.system)
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds per role."""
        out: dict[str, float] = {}
        for name, seconds in self.cpu.values():
            out[name] = out.get(name, 0.0) + seconds
        return out


def timed(
    command: list[str], **kwargs: Any
) -> tuple[float, float, str, dict[str, float]]:
    """Run ``command``; wall seconds, peak tree memory (MiB), stdout, CPU
    seconds per process role."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )
    sampler = Sampler(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    memory = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} exited {proc.returncode}:\n{err[-3000:]}")
    return wall, memory, out, sampler.cpu_by_role()


# -- raw loop ------------------------------------------------------------------
def raw_part(rounds: int) -> None:
    """The workload in one process; prints JSON with per-round timestamps."""
    start = time.time()
    import numpy as np
    import torch
    import torch.nn.functional as F

    from fedsim.core.loading import load_experiment
    from fedsim.learn.data import federated_data
    from fedsim.learn.models import build_architecture

    exp = load_experiment(None, [*WORKLOAD, f"rounds={rounds}"])
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    net = build_architecture(exp.model, data.info, exp.seed)
    clients = [data.client(i) for i in range(exp.federation.clients)]

    def test(x: np.ndarray, y: np.ndarray) -> float:
        net.eval()
        with torch.no_grad():
            return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())

    weights = {k: v.clone() for k, v in net.state_dict().items()}
    stamps = [time.time()]
    accuracy = 0.0
    for _ in range(rounds):
        total = {k: torch.zeros(v.shape) for k, v in weights.items()}
        examples = 0
        for client in clients:
            net.load_state_dict(weights)
            opt = torch.optim.Adam(net.parameters(), lr=exp.train.lr)
            net.train()
            n = len(client.train)
            for _ in range(exp.train.epochs):
                order = np.random.permutation(n)
                for i in range(0, n, exp.train.batch_size):
                    rows = order[i : i + exp.train.batch_size]
                    xb = torch.from_numpy(client.train.x[rows])
                    yb = torch.from_numpy(client.train.y[rows])
                    opt.zero_grad()
                    F.cross_entropy(net(xb), yb).backward()
                    opt.step()
            for k, v in net.state_dict().items():
                total[k] += v.float() * n
            examples += n
        weights = {k: (v / examples).to(weights[k].dtype) for k, v in total.items()}
        net.load_state_dict(weights)
        for client in clients:
            test(client.test.x, client.test.y)
        accuracy = test(data.test.x, data.test.y)
        stamps.append(time.time())
    print(json.dumps({"start": start, "round_end": stamps, "accuracy": accuracy}))


def raw(rounds: int) -> dict[str, Any]:
    wall, memory, out, cpu = timed(
        [sys.executable, __file__, "--part", "raw", "--rounds", str(rounds)]
    )
    got = json.loads(out.strip().splitlines()[-1])
    ends = got["round_end"]
    return {
        "wall": wall,
        "memory": memory,
        "before_round_1": ends[0] - got["start"],
        "first_round": ends[1] - ends[0],
        "steady_round": (ends[-1] - ends[1]) / max(len(ends) - 2, 1),
        "accuracy": got["accuracy"],
        **{f"cpu_{name}": seconds for name, seconds in cpu.items()},
    }


# -- plain Flower ----------------------------------------------------------------
def plain_flower(rounds: int, clients: int = 10) -> dict[str, Any]:
    from fedsim.engine.host import processes, superlink

    work = Path(tempfile.mkdtemp(prefix="plain-flower-"))
    app = work / "app"
    shutil.copytree(HERE / "plain_flower", app)
    timings = work / "timings.json"
    port = processes.free_port()
    home, env = superlink.flower_home(superlink.loopback(port))
    # Flower's own flwr-simulation, not the launcher fedsim's SuperLinks use
    env["PATH"] = superlink.environment_path()
    start = time.perf_counter()
    stamp0 = time.time()
    command = superlink.superlink_command(port, simulation=True)
    link = superlink.spawn(command, env, work / "superlink.log")
    try:
        sampler = Sampler(link.pid)
        superlink.wait_healthy(link, port, work / "superlink.log")
        command = [
            superlink.executable("flwr"),
            "run",
            str(app),
            "fedsim",
            "--stream",
            "--federation-config",
            f"num-supernodes={clients} client-resources-num-cpus=1",
            "--run-config",
            f"rounds={rounds} clients={clients} timings-file='{timings}'",
        ]
        subprocess.run(command, env=env, capture_output=True, check=True)
        wall = time.perf_counter() - start
    finally:
        processes.stop_tree(link.pid)
        memory = sampler.stop()
        shutil.rmtree(home, ignore_errors=True)
    got = json.loads(timings.read_text())
    ends = got["round_end"]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "wall": wall,
        "memory": memory,
        "before_round_1": ends[0] - stamp0,
        "first_round": ends[1] - ends[0],
        "steady_round": (ends[-1] - ends[1]) / max(len(ends) - 2, 1),
        "accuracy": got["accuracy"][-1],
        **{f"cpu_{name}": seconds for name, seconds in sampler.cpu_by_role().items()},
    }


# -- fedsim ------------------------------------------------------------------------
def fedsim(overrides: list[str]) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="fedsim-bench-"))
    stamp0 = time.time()
    wall, memory, _, cpu = timed(fedsim_command(None, overrides, out))
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    started = datetime.fromisoformat(summary["started_at"]).timestamp()
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    server = frame[frame["phase"] == "server"].pivot(
        index="round", columns="metric", values="value"
    )
    elapsed = server["elapsed"]
    last = int(server.index.max())
    clients = frame[frame["client"].notna() & (frame["metric"] == "seconds")]
    steady = clients[clients["round"] > 1]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall": wall,
        "memory": memory,
        "before_server": started - stamp0,
        "before_round_1": started - stamp0 + elapsed[0],
        "first_round": elapsed[1] - elapsed[0],
        "steady_round": (elapsed[last] - elapsed[1]) / max(last - 1, 1),
        "client_seconds": steady["value"].sum() / max(last - 1, 1),
        "after_last_round": wall - (started - stamp0) - elapsed[last],
        "accuracy": float(server.loc[last, "accuracy"]),
        **{f"cpu_{name}": seconds for name, seconds in cpu.items()},
    }


def cpu_split(got: dict[str, Any]) -> str:
    """CPU seconds of the run: Ray's client actors, the runtime (ServerApp and
    simulation engine), everything else."""
    cpu = {k[4:]: v for k, v in got.items() if k.startswith("cpu_")}
    clients, runtime = cpu.pop("clients", 0.0), cpu.pop("runtime", 0.0)
    if not clients and not runtime:
        return f"{sum(cpu.values()):.0f}"
    return f"{clients:.0f} / {runtime:.0f} / {sum(cpu.values()):.0f}"


def row(name: str, got: dict[str, Any], base: dict[str, Any] | None) -> dict[str, str]:
    def s(key: str) -> str:
        return f"{got[key]:.2f}" if key in got else ""

    return {
        "run": name,
        "wall s": f"{got['wall']:.1f}",
        "vs plain Flower": f"{got['wall'] / base['wall']:.2f}x" if base else "",
        "before round 1 s": f"{got['before_round_1']:.1f}",
        "round 1 s": s("first_round"),
        "steady round s": s("steady_round"),
        "client s / round / CPU": (
            f"{got['client_seconds'] / (psutil.cpu_count() or 1):.2f}"
            if "client_seconds" in got
            else ""
        ),
        "peak memory MiB": f"{got['memory']:.0f}",
        "CPU s clients / runtime / rest": cpu_split(got),
        "accuracy": f"{got['accuracy']:.4f}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--part", choices=["raw"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="also write the table into its docs page",
    )
    args = parser.parse_args()
    if args.write_docs:
        check_block("explanations/performance.md", "performance")
    if args.part == "raw":
        raw_part(args.rounds)
        return 0
    results = {
        "raw loop": raw(args.rounds),
        "plain Flower": plain_flower(args.rounds),
        "fedsim": fedsim([*WORKLOAD, f"rounds={args.rounds}"]),
    }
    if args.scale:
        results["fedsim 100 clients"] = fedsim([*SCALE, "federation.clients=100"])
        results["fedsim 1000 clients"] = fedsim([*SCALE, "federation.clients=1000"])
    for name, got in results.items():
        print(name, json.dumps({k: round(v, 3) for k, v in got.items()}), flush=True)
    base = results["plain Flower"]
    rows = [row(n, g, None if n == "raw loop" else base) for n, g in results.items()]
    print()
    table = markdown(rows, ("run",))
    print(table)
    fed, rawr = results["fedsim"], results["raw loop"]
    ratios = [
        f"fedsim / plain Flower (wall): {fed['wall'] / base['wall']:.2f}x; "
        f"fedsim / raw loop (steady round): "
        f"{fed['steady_round'] / rawr['steady_round']:.2f}x"
    ]
    print("\n" + ratios[0])
    if args.scale:
        big, small = results["fedsim 1000 clients"], results["fedsim 100 clients"]
        cpus = psutil.cpu_count() or 1
        ratios.append(
            f"1000 clients: steady round / (client seconds / CPUs) = "
            f"{big['steady_round'] / (big['client_seconds'] / cpus):.2f}x; "
            f"before round 1 beyond 100 clients: "
            f"{big['before_round_1'] - small['before_round_1']:.1f} s; "
            f"memory 1000 / 100 clients: {big['memory'] / small['memory']:.2f}x"
        )
        print(ratios[-1])
    if args.write_docs:
        text = table + "\n\n" + "\n\n".join(ratios)
        page = write_block("explanations/performance.md", "performance", text)
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
