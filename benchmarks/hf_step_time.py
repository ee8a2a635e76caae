"""Time per local LoRA step: fedsim's client path vs a plain PEFT + PyTorch loop
on the same batches, and resident memory of one process serving several
clients.

Usage::

    python benchmarks/hf_step_time.py [--size small] [--steps 20] [--clients 4]

The model is a LLaMA-shaped ``transformers`` model built from a config
(:func:`fedsim.learn.tiny.model_config`, random init, vocabulary 2048, 64-token
rows, batch 8) with LoRA r = 8 on q/k/v/o. fedsim's path: ``HFModel`` +
:func:`fedsim.learn.lora.inject_lora` + :func:`fedsim.learn.training.train_epochs`
with the causal-LM task's loss (what a LoRA client runs each round). Plain path:
``get_peft_model`` + ``model(input_ids, attention_mask, labels).loss`` +
``AdamW``. Both see the same batches, two warm-up steps first; plain: the
median step; fedsim: the mean step of one ``train_epochs`` pass (per client,
then the median over clients). Memory: the process's RSS after loading the base
once, then after :class:`fedsim.clients.lora.LoraClient`-style rounds for
``--clients`` partitions on that one resident base.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch


def batches(vocab: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Tokenised rows ``(8, 2, 64)``: random ids, prompt 16 tokens, response 48."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.zeros(8, 2, 64, dtype=torch.long)
        x[:, 0] = torch.randint(4, vocab, (8, 64), generator=gen)
        x[:, 1, :16] = 1
        x[:, 1, 16:] = 2
        out.append(x)
    return out


def median_step(step: Any, data: list[torch.Tensor]) -> float:
    times = []
    for i, x in enumerate(data):
        start = time.perf_counter()
        step(x)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", nargs="+", default=["small"], choices=("mini", "small", "base")
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help='write the table into docs/tutorials/hugging-face.md ("hf-step-time")',
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.write_docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from pages import check_block

        check_block("tutorials/hugging-face.md", "hf-step-time")
    rows, notes = [], []
    for size in args.size:
        row, note = measure(size, args.steps, args.clients)
        rows.append(row)
        notes.append(note)
    table = "\n".join(
        [
            "| model | parameters | plain PEFT s/step | fedsim s/step | ratio |",
            "|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table + "\n\n" + "\n\n".join(notes))
    if args.write_docs:
        from pages import write_block

        write_block(
            "tutorials/hugging-face.md",
            "hf-step-time",
            table + "\n\n" + "\n\n".join(notes),
        )


def measure(size: str, steps: int, clients: int) -> tuple[str, str]:
    """One model size: its table row and its resident-memory line."""

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedsim.core.loading import load_experiment
    from fedsim.learn.hf import HFModel
    from fedsim.learn.lora import inject_lora, lora_layout
    from fedsim.learn.tasks import CausalLM
    from fedsim.learn.text import TARGET
    from fedsim.learn.tiny import model_config
    from fedsim.learn.training import train_epochs

    class Vocab:  # model_config reads the special ids and the size
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self) -> int:
            return 2048

    process = psutil.Process()
    rss0 = process.memory_info().rss
    config = model_config("llama", Vocab(), size=size)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in hf.parameters())
    data = batches(2048, steps)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]

    plain = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=8, lora_alpha=16, target_modules=targets),
    )
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], 1e-3)

    def plain_step(x: torch.Tensor) -> None:
        labels = torch.where(x[:, 1] == TARGET, x[:, 0], -100)
        loss = plain(
            input_ids=x[:, 0], attention_mask=(x[:, 1] > 0).long(), labels=labels
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    exp = load_experiment(
        None,
        [
            "peft.method=lora",
            "strategy.name=flora",
            'peft.targets=["q_proj","k_proj","v_proj","o_proj"]',
            "peft.modules-to-save=[]",
            "peft.rank=8",
        ],
    )
    base = HFModel(hf, "causal-lm")
    base.requires_grad_(False)
    rss_base = process.memory_info().rss
    layout = lora_layout(base, exp.peft)
    task = CausalLM()

    def fedsim_round(seed: int) -> float:
        model = inject_lora(base, exp.peft, layout, rank=8, init_seed=seed)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], 1e-3
        )
        pairs = [(x, x[:, 0, 0]) for x in data]
        cpu = torch.device("cpu")
        train_epochs(model, pairs[:2], optimizer, epochs=1, device=cpu, loss=task.loss)
        start = time.perf_counter()
        stats = train_epochs(
            model, pairs[2:], optimizer, epochs=1, device=cpu, loss=task.loss
        )
        seconds = (time.perf_counter() - start) / stats.steps
        model.unload()
        return seconds

    t_plain = median_step(plain_step, data)
    t_fedsim = [fedsim_round(k) for k in range(clients)]
    rss_served = process.memory_info().rss
    mib = 2**20
    median = statistics.median(t_fedsim)
    row = (
        f"| llama-{size} | {params / 1e6:.2f}M | {t_plain:.4f} | "
        f"{median:.4f} | {median / t_plain:.2f} |"
    )
    note = (
        f"llama-{size} RSS: {rss0 / mib:.0f} MiB at start, {rss_base / mib:.0f} MiB "
        f"with the base (and the plain copy) loaded, {rss_served / mib:.0f} MiB after "
        f"{clients} clients' LoRA rounds on the one resident base "
        f"(fp32 base: {params * 4 / mib:.0f} MiB)"
    )
    print(row, flush=True)
    return row, note


if __name__ == "__main__":
    main()
