"""Text rows and their tokenisation: text classification and instruction tuning.

Loading (:func:`load_text`) keeps text as text: every row becomes two strings,
a *context* (no loss) and a *target* (the tokens a causal LM learns to emit),
held in an ``Arrays`` whose ``x`` is a unicode array of shape ``(n, 2)``. So text
flows through the same splitting and partitioning (row indices over ``y``) as
every other dataset, and the data cache stores it as plain strings.

=======================  ====================  =====================
``data.format``          context (column 0)    target (column 1)
=======================  ====================  =====================
``""`` + text-column     the text              ``""`` (y: its label)
``"text"``               ``""``                the text
``"alpaca"``             the prompt            ``output``
``"dolly"``              the prompt            ``response``
=======================  ====================  =====================

The prompt of an instruction row is ``data.template`` filled with
``{instruction}`` and ``{input}`` (Alpaca's ``input``, Dolly's ``context``); the
default is the Stanford Alpaca template, with its no-input variant for rows
whose input is empty.

Tokenisation (:func:`tokenize_rows`) turns those strings into an int64 array of
shape ``(n, 2, max_length)``: channel 0 the token ids (right-padded with the
pad id), channel 1 each position's kind: :data:`PAD` (not attended),
:data:`CONTEXT` (attended, no loss), :data:`TARGET` (attended, in the loss). A
batch is trimmed to its longest row when it is used (:func:`trim`): dynamic
padding, the same ids and attention mask as the tokenizer's own call with
``padding="longest"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import DataConfig
from fedsim.learn.data import Arrays, DatasetInfo
from fedsim.learn.tables import labels

#: Token kinds (channel 1 of a tokenised row).
PAD, CONTEXT, TARGET = 0, 1, 2

#: Stanford Alpaca's prompt (``{input}`` given) and its no-input variant.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Response:\n"
)

#: Columns of each instruction layout: instruction, input, response.
LAYOUTS = {
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
}

_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def is_text(cfg: DataConfig) -> bool:
    """Whether the data config asks for text rows (a format or a text column)."""
    return bool(cfg.format or cfg.text_column)


def _load_table(cfg: DataConfig) -> Any:
    """The rows as a ``datasets.Dataset``: a local JSON / JSONL / Parquet / CSV
    file (``data.path``) or a Hugging Face dataset (``hf:NAME``)."""
    import datasets

    datasets.disable_progress_bars()
    if cfg.dataset.startswith("hf:"):
        name = cfg.dataset.removeprefix("hf:")
        kwargs: dict[str, Any] = {"split": cfg.split}
        if cfg.path:
            kwargs["data_files"] = cfg.path
        source = name
    else:
        path = Path(cfg.path)
        if not path.is_file():
            raise ConfigError(f"data.path: file not found: {cfg.path!r}")
        builder = _SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(
                f"data.path: {path.name!r} must end in .json, .jsonl, .parquet "
                "or .csv for text data"
            )
        name, source = builder, str(path)
        kwargs = {"data_files": str(path), "split": "train"}
    try:
        return datasets.load_dataset(name, **kwargs)
    except Exception as err:  # the datasets library raises many types
        message = " ".join(str(err).split())[:200]
        raise ConfigError(f"data.path: cannot read {source!r}: {message}") from None


def _column(ds: Any, name: str, key: str) -> list[str]:
    if name not in ds.column_names:
        raise ConfigError(
            f"{key} {name!r} is not a column; columns: {', '.join(ds.column_names)}"
        )
    return ["" if v is None else str(v) for v in ds[name]]


def prompt(template: str, instruction: str, context: str) -> str:
    """The prompt of one instruction row (``data.template`` or Alpaca's)."""
    if template:
        return template.format(instruction=instruction, input=context)
    if context:
        return ALPACA_TEMPLATE.format(instruction=instruction, input=context)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def rows_of(ds: Any, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Context/target strings ``(n, 2)``, labels and class count of a table."""
    n = len(ds)
    if cfg.format in LAYOUTS:
        ins_col, ctx_col, out_col = LAYOUTS[cfg.format]
        key = f"data.format: {cfg.format!r} rows need a column"
        ins = _column(ds, ins_col, key)
        ctx = _column(ds, ctx_col, key) if ctx_col in ds.column_names else [""] * n
        out = _column(ds, out_col, key)
        pairs = [[prompt(cfg.template, i, c), o] for i, c, o in zip(ins, ctx, out)]
        return np.asarray(pairs, dtype=str), np.zeros(n, np.int64), 1
    column = cfg.text_column or "text"
    texts = _column(ds, column, "data.text-column:")
    if cfg.format == "text":
        pairs = [["", t] for t in texts]
        return np.asarray(pairs, dtype=str), np.zeros(n, np.int64), 1
    if cfg.label_column not in ds.column_names:
        raise ConfigError(
            f"data.label-column: {cfg.label_column!r} is not a column; "
            f"columns: {', '.join(ds.column_names)}"
        )
    y, num_classes = labels(np.asarray(ds[cfg.label_column]), column, cfg)
    pairs = [[t, ""] for t in texts]
    return np.asarray(pairs, dtype=str), y, num_classes


def load_text(cfg: DataConfig, seed: int) -> tuple[Arrays, DatasetInfo]:
    """Text rows of a local file or a Hugging Face dataset (see module doc).

    ``DatasetInfo.input_shape`` is ``(2, max_length)``, the shape of a tokenised
    row; ``num_classes`` is 1 for causal-LM data.
    """
    x, y, num_classes = rows_of(_load_table(cfg), cfg)
    if len(x) == 0:
        raise ConfigError(f"data.path: {cfg.path or cfg.dataset!r} has no rows")
    return Arrays(x, y), DatasetInfo((2, cfg.max_length), num_classes)


def pad_id(tokenizer: Any) -> int:
    """The id written in padded positions (never attended)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_rows(x: np.ndarray, tokenizer: Any, max_length: int) -> np.ndarray:
    """Token ids and kinds ``(n, 2, max_length)`` of context/target rows.

    A row without a target (text classification) is the tokenizer's own call
    ``tokenizer(text, truncation=True, max_length=max_length)``. A row with a
    target is the context tokenised with the tokenizer's special tokens, then
    the target without them and the EOS token (the Alpaca recipe: the response
    is learnt up to its end), truncated to ``max_length``.
    """
    out = np.zeros((len(x), 2, max_length), dtype=np.int64)
    out[:, 0] = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    for i, (context, target) in enumerate(x):
        if not target:
            ids = tokenizer(str(context), truncation=True, max_length=max_length)[
                "input_ids"
            ]
            kinds = [CONTEXT] * len(ids)
        else:
            head = (
                tokenizer(str(context))["input_ids"] if context else []
            )  # special tokens (e.g. BOS) as the tokenizer adds them
            tail = tokenizer(str(target), add_special_tokens=False)["input_ids"]
            tail = tail + ([eos] if eos is not None else [])
            ids = (head + tail)[:max_length]
            kinds = ([CONTEXT] * len(head) + [TARGET] * len(tail))[:max_length]
        out[i, 0, : len(ids)] = ids
        out[i, 1, : len(kinds)] = kinds
    return out


def trim(x: Any) -> Any:
    """A tokenised batch ``(b, 2, L)`` cut to its longest row (dynamic padding)."""
    longest = int((x[:, 1] != PAD).sum(dim=1).max()) if len(x) else 0
    return x[:, :, : max(longest, 1)]
