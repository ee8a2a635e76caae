"""Offline assets of the causal-LM instruction-tuning experiments
(experiments/llama_instruct.toml): a LLaMA-shaped model pre-trained briefly,
centrally, on local text, and an Alpaca-format instruction file.

Usage::

    python benchmarks/hf_assets.py [--out runs/hf] [--steps 300]

- Tokenizer: byte-level BPE (at most 1024 tokens; 426 are learnt from this
  small vocabulary) trained with ``tokenizers`` on the
  pre-training text and the instruction rows.
- Model: ``LlamaConfig`` hidden 64, 2 layers, 4 heads (2 KV heads), SwiGLU 170,
  random init (seed 0), then ``--steps`` AdamW steps (lr 3e-3, batch 16 blocks
  of 64 tokens) of next-token prediction on the pre-training text
  (:func:`pretraining_text`: 6,000 seeded sentences over the tasks' words, no
  instruction template; the same in every checkout, unlike the repository's
  own files, which the previous version used). Saved with ``save_pretrained``
  to ``OUT/llama-pretrained``.
- Data: ``OUT/instruct.json``, ``--rows`` (200) Alpaca rows of four word
  tasks over a fixed vocabulary (name the first word, reverse the words, say a
  word twice, sort numbers), seeded; the tokenizer is trained on the first 600
  such rows whatever ``--rows``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

WORDS = (
    "red green blue small large fast slow cat dog bird fish tree river stone "
    "light dark warm cold apple bread water fire cloud rain sun moon"
).split()
NUMBERS = "one two three four five six seven eight nine".split()


def instructions(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows of four small word tasks."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 4)
        kind = i % 4
        if kind == 0:
            row = ("Name the first word.", " ".join(words), words[0])
        elif kind == 1:
            row = ("Reverse the words.", " ".join(words), " ".join(words[::-1]))
        elif kind == 2:
            row = (f"Say {words[1]} twice.", "", f"{words[1]} {words[1]}")
        else:
            picked = rng.sample(range(9), 3)
            row = (
                "Sort the numbers.",
                " ".join(NUMBERS[p] for p in picked),
                " ".join(NUMBERS[p] for p in sorted(picked)),
            )
        rows.append(dict(zip(("instruction", "input", "output"), row)))
    return rows


ADJECTIVES = "small large fast slow light dark warm cold".split()
NOUNS = (
    "cat dog bird fish tree river stone apple bread water fire cloud rain sun moon"
).split()
COLOURS = "red green blue".split()


def pretraining_text(sentences: int = 6000, seed: int = 0) -> list[str]:
    """The pre-training corpus: ``sentences`` plain sentences over the
    instruction tasks' words, drawn from a generator seeded with ``seed``
    (so the corpus is the same on every machine and in every checkout: it
    depends on this function only, not on the repository's files). Four kinds,
    in turn: a description ("the small cat is red."), a list of 3-6 words,
    counting up from a number ("three four five six"), a sentence naming
    two things ("the bird and the river."). None has the instruction template;
    counting shows the numbers' order, which the sorting task asks for."""
    rng = random.Random(seed)
    out = []
    for i in range(sentences):
        kind = i % 4
        if kind == 0:
            words = [
                "the",
                rng.choice(ADJECTIVES),
                rng.choice(NOUNS),
                "is",
                rng.choice(COLOURS + ADJECTIVES),
            ]
            out.append(" ".join(words) + ".")
        elif kind == 1:
            out.append(" ".join(rng.sample(WORDS, rng.randint(3, 6))))
        elif kind == 2:
            start = rng.randrange(6)
            out.append(" ".join(NUMBERS[start : start + rng.randint(2, 4)]))
        else:
            a, b = rng.sample(NOUNS, 2)
            out.append(f"the {a} and the {b}.")
    return out


def pretrain(folder: Path, steps: int, seed: int = 0) -> float:
    """Pre-train the saved model in ``folder`` in place; returns the last loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor(
        tokenizer("\n".join(pretraining_text()))["input_ids"], dtype=torch.long
    )
    block, batch = 64, 16
    blocks = ids[: len(ids) // block * block].view(-1, block)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = blocks[torch.randint(len(blocks), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hf"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    from fedsim.learn.tiny import make_folder

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instruct.json").write_text(json.dumps(instructions(args.rows)))
    rows = instructions(600)  # the tokenizer sees these, whatever --rows
    texts = pretraining_text() + [" ".join(r.values()) for r in rows]
    folder = make_folder(
        args.out / "llama-pretrained", "llama", texts, size="mini", vocab_size=1024
    )
    start = time.perf_counter()
    loss = pretrain(folder, args.steps)
    print(
        f"{folder}: pre-trained {args.steps} steps in "
        f"{time.perf_counter() - start:.0f} s, last loss {loss:.3f}"
    )


if __name__ == "__main__":
    main()
