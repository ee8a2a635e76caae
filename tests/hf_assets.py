"""Offline Hugging Face assets for the tests: tiny random-init model folders
with a tokenizer trained here, and instruction / text-classification files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "red green blue small large fast slow cat dog bird fish tree river stone "
    "light dark warm cold one two three four five six seven eight nine ten"
).split()


def instructions(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows of small word tasks (some with an input, some without)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 4)
        if i % 3 == 0:
            rows.append(
                {
                    "instruction": "Name the first word.",
                    "input": " ".join(words),
                    "output": words[0],
                }
            )
        elif i % 3 == 1:
            rows.append(
                {
                    "instruction": "Reverse the words.",
                    "input": " ".join(words),
                    "output": " ".join(reversed(words)),
                }
            )
        else:
            rows.append(
                {
                    "instruction": f"Say {words[1]} twice.",
                    "input": "",
                    "output": f"{words[1]} {words[1]}",
                }
            )
    return rows


def labelled(n: int, seed: int = 0) -> list[dict[str, object]]:
    """Text-classification rows: does the sentence name an animal?"""
    rng = random.Random(seed)
    animals = {"cat", "dog", "bird", "fish"}
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 9))
        rows.append({"text": " ".join(words), "label": int(bool(animals & set(words)))})
    return rows


def corpus() -> list[str]:
    texts = [" ".join(r.values()) for r in instructions(200)]
    texts += [str(r["text"]) for r in labelled(200)]
    return texts


@dataclass(frozen=True)
class HfAssets:
    llama: Path
    gpt2: Path
    bert: Path
    alpaca: Path
    dolly: Path
    text_csv: Path
    labelled_parquet: Path


def make_assets(root: Path) -> HfAssets:
    """Write every asset under ``root`` (a second or two)."""
    import pandas as pd

    from fedsim.learn.tiny import make_folder

    texts = corpus()
    folders = {
        a: make_folder(root / a, a, texts, vocab_size=600)
        for a in ("llama", "gpt2", "bert")
    }
    rows = instructions(96)
    alpaca = root / "alpaca.json"
    alpaca.write_text(json.dumps(rows))
    dolly = root / "dolly.jsonl"
    dolly.write_text(
        "\n".join(
            json.dumps(
                {
                    "instruction": r["instruction"],
                    "context": r["input"],
                    "response": r["output"],
                    "category": "x",
                }
            )
            for r in rows
        )
    )
    text_csv = root / "text.csv"
    pd.DataFrame({"body": [" ".join(r.values()) for r in rows]}).to_csv(
        text_csv, index=False
    )
    labelled_parquet = root / "labelled.parquet"
    pd.DataFrame(labelled(120)).to_parquet(labelled_parquet)
    return HfAssets(
        folders["llama"],
        folders["gpt2"],
        folders["bert"],
        alpaca,
        dolly,
        text_csv,
        labelled_parquet,
    )
