"""Resident memory of each Ray actor of a real ``fedsim run`` of LoRA
fine-tuning on a LLaMA-shaped model, as the number of clients it serves grows.

Usage::

    nice -n 15 python benchmarks/hf_actor_memory.py [--size base] \
        [--clients 2 4 8] [--rounds 2] [--rows 200] [--write-docs]

The model folder (:func:`fedsim.learn.tiny.make_folder`: LLaMA-shaped, random
init, BPE vocabulary 2048 trained on fedsim's sources; ``base`` = hidden 768,
12 layers, ~81M parameters) and an Alpaca file of ``--rows`` (200) rows
(:func:`hf_assets.instructions`) are written under ``--work``. Each
configuration is one ``fedsim run`` (FLoRA, LoRA r = 8 on q/k/v/o, 1 epoch,
batch 8, ``data.max-length`` 64, 10 % held out, IID): Flower's simulation
runtime on a private Ray with ``resources.num-cpus = 1``, so a 2-core machine
runs 2 actors, which serve every client of every round between them. The same
rows are split over 2, 4 or 8 clients, so every configuration trains on the
same data; what changes is how many clients (partitions, adapters, optimizer
states, messages) each actor serves.

While a run lasts, every 0.5 s the script finds the actor processes among the
descendants of the ``fedsim run`` process (command line naming
``ClientAppActor``) and reads each one's RSS and PSS (``psutil``
``memory_full_info``); the table gives each actor's peak. For scale: the base's
fp32 weights (parameters x 4 bytes) and the RSS of a fresh Python process
after importing fedsim's ClientApp, before and after building the model once
(:func:`fedsim.learn.base.build_model` on the same folder) — what one copy
of the base costs a process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_run import fedsim_command  # noqa: E402
from hf_assets import instructions  # noqa: E402
from pages import write_block  # noqa: E402

MIB = 2**20
TARGETS = '["q_proj","k_proj","v_proj","o_proj"]'


def assets(work: Path, size: str, rows: int) -> tuple[Path, Path]:
    """The model folder and the instruction file (made once per ``work``)."""
    from fedsim.learn.tiny import default_texts, make_folder

    folder = work / f"llama-{size}"
    data = work / "instruct.json"
    if not (folder / "config.json").exists():
        texts = default_texts() + [" ".join(r.values()) for r in instructions(600)]
        make_folder(folder, "llama", texts, size=size, vocab_size=2048)
    data.write_text(json.dumps(instructions(rows)))
    return folder, data


def overrides(folder: Path, data: Path, clients: int, rounds: int) -> list[str]:
    return [
        f"name=actor-memory-{clients}",
        f"rounds={rounds}",
        f"federation.clients={clients}",
        "resources.num-cpus=1",
        "data.dataset=file",
        f"data.path={data}",
        "data.format=alpaca",
        "data.partitioner=iid",
        "data.max-length=64",
        "data.test-fraction=0.1",
        "model.name=hf",
        f"model.path={folder}",
        "model.task=causal-lm",
        "train.epochs=1",
        "train.batch-size=8",
        "strategy.name=flora",
        "peft.method=lora",
        f"peft.targets={TARGETS}",
        "peft.modules-to-save=[]",
        "peft.rank=8",
    ]


def actors(root: psutil.Process) -> list[psutil.Process]:
    """The Ray actor processes among ``root``'s descendants."""
    found = []
    try:
        children = root.children(recursive=True)
    except psutil.Error:  # the run (or a process on the way) just ended
        return found
    for proc in children:
        try:
            if "ClientAppActor" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def sample(
    root: psutil.Process, peaks: dict[int, list[float]], stop: threading.Event
) -> None:
    """Keep each actor's peak [RSS, PSS] (MiB) in ``peaks`` until ``stop``."""
    while not stop.is_set():
        for proc in actors(root):
            try:
                mem = proc.memory_full_info()
            except psutil.Error:
                continue
            peak = peaks.setdefault(proc.pid, [0.0, 0.0])
            peak[0] = max(peak[0], mem.rss / MIB)
            peak[1] = max(peak[1], mem.pss / MIB)
        stop.wait(0.5)


def measure(command: list[str]) -> tuple[dict[int, list[float]], float, str]:
    """Run ``command``; each actor's peak [RSS, PSS], the seconds, stderr tail."""
    start = time.perf_counter()
    proc = psutil.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peaks: dict[int, list[float]] = {}
    stop = threading.Event()
    thread = threading.Thread(target=sample, args=(proc, peaks, stop), daemon=True)
    thread.start()
    _, err = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return peaks, time.perf_counter() - start, err[-2000:]


def one_copy(sets: list[str]) -> tuple[float, float, int]:
    """RSS (MiB) of a fresh process after importing the ClientApp, then after
    building the model once; and the model's parameter count."""
    code = textwrap.dedent(
        f"""
        import json, psutil, torch
        torch.set_num_threads(1)
        import fedsim.engine.client.client_app
        from fedsim.core.loading import load_experiment
        from fedsim.learn.arrays import DatasetInfo
        from fedsim.learn.base import build_model
        before = psutil.Process().memory_info().rss
        exp = load_experiment(None, {sets!r})
        model = build_model(exp.model, DatasetInfo((2, 64), 2), 0)
        after = psutil.Process().memory_info().rss
        print(json.dumps([before, after, sum(p.numel() for p in model.parameters())]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    before, after, params = json.loads(out.stdout.strip().splitlines()[-1])
    return before / MIB, after / MIB, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base", choices=("mini", "small", "base"))
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/fedsim-hf-actor-memory")
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder, data = assets(args.work, args.size, args.rows)
    imported, loaded, params = one_copy(overrides(folder, data, 2, 1))
    base = params * 4 / MIB
    lines = [
        "| clients | actors | clients per actor | peak RSS per actor (MiB) | "
        "peak PSS per actor (MiB) | run s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in args.clients:
        command = fedsim_command(
            None, overrides(folder, data, clients, args.rounds), args.work / "runs"
        )
        peaks, seconds, _ = measure(command)
        rss = " / ".join(f"{p[0]:.0f}" for p in sorted(peaks.values()))
        pss = " / ".join(f"{p[1]:.0f}" for p in sorted(peaks.values()))
        lines.append(
            f"| {clients} | {len(peaks)} | {clients / max(len(peaks), 1):g} | "
            f"{rss} | {pss} | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines) + (
        f"\n\nModel: llama-{args.size}, {params / 1e6:.2f}M parameters, fp32 "
        f"weights {base:.0f} MiB. A fresh process: {imported:.0f} MiB RSS after "
        f"importing the ClientApp, {loaded:.0f} MiB after building the model "
        f"once (+{loaded - imported:.0f} MiB). {args.rounds} rounds per run, "
        f"{args.rows} rows."
    )
    print()
    print(table)
    if args.write_docs:
        write_block("tutorials/hugging-face.md", "hf-actor-memory", table)


if __name__ == "__main__":
    main()
