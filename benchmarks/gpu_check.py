"""GPU check: federated LoRA fine-tuning of a ~100M-parameter LLaMA-shaped
causal LM, 4 clients sharing one GPU (``resources.num-gpus = 0.25``), with the
GPU's utilisation and memory sampled by ``nvidia-smi`` while it runs.

Usage (on a machine with a CUDA GPU; nothing is downloaded)::

    python benchmarks/gpu_check.py [--rounds 2] [--dtype bfloat16] [--out DIR]

The model is random-init (:func:`fedsim.learn.tiny.make_folder`, size ``base``:
hidden 768, 12 layers, vocabulary 8192), the data the Alpaca rows of
``benchmarks/hf_assets.py``; FLoRA with r = 8 on q/k/v/o. Prints the run's
final loss and perplexity, its wall time, and the peak / mean GPU utilisation
and peak memory used.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hf_assets import instructions, pretraining_text


def sample_gpu(samples: list[tuple[float, float]], stop: threading.Event) -> None:
    """Append (utilisation %, memory MiB) of GPU 0 every half second."""
    query = [
        "nvidia-smi",
        "--query-gpu=utilization.gpu,memory.used",
        "--format=csv,noheader,nounits",
        "--id=0",
    ]
    while not stop.is_set():
        out = subprocess.run(query, capture_output=True, text=True).stdout.strip()
        if out:
            util, mem = (float(v) for v in out.split(","))
            samples.append((util, mem))
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible")
    from fedsim.learn.tiny import make_folder

    root = args.out or Path(tempfile.mkdtemp(prefix="fedsim-gpu-"))
    rows = instructions(800)
    (root / "instruct.json").write_text(json.dumps(rows))
    texts = pretraining_text() + [" ".join(r.values()) for r in rows]
    folder = make_folder(
        root / "llama-100m", "llama", texts, size="base", vocab_size=8192
    )
    overrides = [
        "model.name=hf",
        f"model.path={folder}",
        "model.task=causal-lm",
        f"model.dtype={args.dtype}",
        "data.dataset=file",
        f"data.path={root / 'instruct.json'}",
        "data.format=alpaca",
        "data.partitioner=iid",
        "data.max-length=256",
        "federation.clients=4",
        f"rounds={args.rounds}",
        "strategy.name=flora",
        "peft.method=lora",
        "peft.rank=8",
        'peft.targets=["q_proj","k_proj","v_proj","o_proj"]',
        "peft.modules-to-save=[]",
        "train.batch-size=16",
        "train.optimizer=adam",
        "train.lr=0.0003",
        "resources.num-gpus=0.25",
        "resources.num-cpus=1",
    ]
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    thread = threading.Thread(target=sample_gpu, args=(samples, stop), daemon=True)
    thread.start()
    start = time.perf_counter()
    argv = [sys.executable, "-m", "fedsim", "run", "--out", str(root / "runs")]
    for pair in overrides:
        argv += ["--set", pair]
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    print(proc.stdout[-3000:], proc.stderr[-2000:])
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    params = sum(p.numel() for p in model.parameters())
    util = [u for u, _ in samples] or [float("nan")]
    mem = [m for _, m in samples] or [float("nan")]
    print(
        f"model: {params / 1e6:.1f}M parameters, dtype {args.dtype}; 4 clients, "
        f"{args.rounds} rounds, wall {wall:.0f} s, exit {proc.returncode}"
    )
    print(
        f"GPU utilisation: peak {max(util):.0f}%, mean {sum(util) / len(util):.0f}%"
        f" ({len(samples)} samples); memory used: peak {max(mem):.0f} MiB"
    )


if __name__ == "__main__":
    main()
