"""The AMAQ table of the docs: AMAQ against fixed precision at equal bytes,
over seeds.

Usage::

    python benchmarks/amaq_table.py [--out DIR] [--seeds 0,1,2] [--set KEY=VALUE ...]
                                    [--reuse] [--write-docs]

One ``fedsim sweep`` of ``experiments/sfl_v1_amaq_digits.toml`` (SplitFed V1,
the ``cnn`` cut after its second convolution, 5 clients, 10 rounds) over seeds
x ``split.quantization``: float32 (``none``), fixed ``int8`` and ``int4``,
``amaq`` (learned per-channel widths, its budget annealed 8 -> 4 bits over the
run), ``anneal`` 8 -> 4 (every channel at one width that falls uniformly over
the rounds: 8, 8, 7, 7, 6, 6, 5, 5, 4, 4) and ``anneal`` 6 -> 6 (fixed 6 bits);
a second sweep does the same at half the budget, where quantisation error is
larger: ``amaq`` 4 -> 2 (widths in 1..8), ``anneal`` 4 -> 2 (4, 4, 4, 3, 3, 3,
3, 2, 2, 2) and fixed 3 bits.

Equal bytes: ``int8`` and ``int4`` cannot match AMAQ's bytes (they bracket
them); the two ``anneal`` rows can, to the extent integer widths allow: both
average 6.0 bits per value over the run, AMAQ's budget target averages 6.0 and
its learned widths land a little below it (they lag the falling target). Both
use AMAQ's wire format, so their bytes compare bit for bit; the table prints
each row's total bytes relative to AMAQ's so the match is visible.

Prints mean ± std over seeds of the global model's final accuracy (the
server's held-out test set), bytes up and down per round (all clients) and
over the run, the mean bit width the clients sent, AMAQ's accuracy minus each
row's on the same seed (mean ± std of the paired differences), and whether
AMAQ's accuracy interval separates from each other row's (and whether the
paired differences' mean ± std excludes 0). ``--reuse`` tabulates the sweep
already in ``--out``. ``--write-docs`` writes the table and the separation
lines into ``docs/methods/sfprompt-amaq.md`` (block ``amaq-equal-bytes``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli_run import markdown
from pages import write_block
from seeds import (
    ROOT,
    interval,
    mean_std,
    read_sweep,
    seeds_argument,
    separated,
    sweep_runs,
)

from fedsim import analysis

BASE = ROOT / "experiments/sfl_v1_amaq_digits.toml"
NAME = "amaq-equal-bytes"
VARIANTS = (
    {"name": "none", "split.quantization": "none"},
    {"name": "int8", "split.quantization": "int8"},
    {"name": "int4", "split.quantization": "int4"},
    {"name": "amaq", "split.quantization": "amaq"},
    {
        "name": "anneal-8-4",
        "split.quantization": "anneal",
        "split.anneal-start-bits": 8,
        "split.anneal-end-bits": 4,
    },
    {
        "name": "fixed-6",
        "split.quantization": "anneal",
        "split.anneal-start-bits": 6,
        "split.anneal-end-bits": 6,
    },
)
#: The same at half the budget, where the quantisation error is larger.
LOW_NAME = "amaq-low-bits"
LOW_VARIANTS = (
    {
        "name": "amaq",
        "split.quantization": "amaq",
        "split.min-bits": 1,
        "split.amaq-start-bits": 4.0,
        "split.amaq-end-bits": 2.0,
    },
    {
        "name": "anneal-4-2",
        "split.quantization": "anneal",
        "split.anneal-start-bits": 4,
        "split.anneal-end-bits": 2,
    },
    {
        "name": "fixed-3",
        "split.quantization": "anneal",
        "split.anneal-start-bits": 3,
        "split.anneal-end-bits": 3,
    },
)
LABELS = {
    "none": "`none` (float32)",
    "int8": "`int8` (fixed)",
    "int4": "`int4` (fixed)",
    "amaq": "`amaq` (learned widths, budget 8 -> 4)",
    "anneal-8-4": "`anneal` 8 -> 4 (uniform, per round)",
    "fixed-6": "`anneal` 6 -> 6 (fixed 6 bits)",
}
LOW_LABELS = {
    "amaq": "`amaq` (learned widths in 1..8, budget 4 -> 2)",
    "anneal-4-2": "`anneal` 4 -> 2 (uniform, per round)",
    "fixed-3": "`anneal` 3 -> 3 (fixed 3 bits)",
}
#: Each sweep: its name, variants and row labels.
SWEEPS = ((NAME, VARIANTS, LABELS), (LOW_NAME, LOW_VARIANTS, LOW_LABELS))


#: The width of the codecs that send no per-channel ``bits`` (so record no
#: ``mean-bits``).
NOMINAL_BITS = {"none": 32.0, "int8": 8.0, "int4": 4.0}


def measure(run_dir: Path, name: str) -> dict[str, float]:
    """One run of variant ``name``: final server accuracy, bytes per round and
    in all, mean bits."""
    frame = analysis.load_runs([run_dir])
    server = analysis.round_metric(frame, "accuracy", "server")
    comm = analysis.communication(frame)
    comm = comm[comm["round"] > 0]
    bits = frame[(frame["metric"] == "mean-bits") & frame["client"].isna()]
    return {
        "accuracy": float(server.iloc[-1, -1]),
        "up": float(comm["bytes_up"].mean() / 1e6),
        "down": float(comm["bytes_down"].mean() / 1e6),
        "mb": float(comm["bytes"].sum() / 1e6),
        "bits": float(bits["value"].mean()) if len(bits) else NOMINAL_BITS[name],
    }


def paired(amaq: list[dict[str, float]], other: list[dict[str, float]]) -> str:
    """Mean ± std over seeds of AMAQ's accuracy minus ``other``'s on the same
    seed (runs in seed order)."""
    return mean_std(
        [a["accuracy"] - b["accuracy"] for a, b in zip(amaq, other, strict=True)]
    )


def table(measured: dict[str, list[dict[str, float]]], labels: dict[str, str]) -> str:
    """The Markdown table and the separation lines."""
    amaq_mb = sum(r["mb"] for r in measured["amaq"]) / len(measured["amaq"])
    rows = [
        {
            "`split.quantization`": labels.get(name, name),
            "seeds": str(len(m)),
            "accuracy": mean_std([r["accuracy"] for r in m]),
            "amaq - this (paired)": ""
            if name == "amaq"
            else paired(measured["amaq"], m),
            "up/round (MB)": mean_std([r["up"] for r in m]),
            "down/round (MB)": mean_std([r["down"] for r in m]),
            "total (MB)": mean_std([r["mb"] for r in m], 2),
            "mean bits": mean_std([r["bits"] for r in m], 2),
            "bytes vs amaq": f"{sum(r['mb'] for r in m) / len(m) / amaq_mb:.3f}",
        }
        for name, m in measured.items()
    ]
    lines = [markdown(rows, ("`split.quantization`",)), ""]
    amaq = [r["accuracy"] for r in measured["amaq"]]
    for name, m in measured.items():
        if name == "amaq":
            continue
        apart = separated(amaq, [r["accuracy"] for r in m])
        verdict = "intervals separate" if apart else "intervals overlap"
        diffs = [a - r["accuracy"] for a, r in zip(amaq, m, strict=True)]
        lo, hi = interval(diffs)
        signed = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
        lines.append(
            f"- accuracy, `amaq` vs {labels.get(name, name)}: {verdict}; "
            f"paired difference {signed}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tables"))
    parser.add_argument("--seeds", type=seeds_argument, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--reuse", action="store_true", help="tabulate the sweep in --out"
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    parts = []
    for name, variants, labels in SWEEPS:
        if args.reuse:
            runs = read_sweep(args.out / name)
        else:
            runs = sweep_runs(
                BASE,
                variants,
                args.seeds,
                args.out,
                name=name,
                overrides=args.overrides,
            )
        measured = {v: [measure(d, v) for d in dirs] for v, dirs in runs.items()}
        budget = "8 -> 4" if name == NAME else "4 -> 2"
        parts.append(f"Budget {budget} bits:\n\n{table(measured, labels)}")
    text = "\n\n".join(parts)
    print(text)
    if args.write_docs:
        write_block("methods/sfprompt-amaq.md", NAME, text, script=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
