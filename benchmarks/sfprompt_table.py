"""The SFPrompt table of the docs: SFPrompt, U-shaped split fine-tuning and
federated full fine-tuning (FedAvg of the whole pre-trained ViT, the paper's
baseline) on one federation, over seeds.

Usage::

    python benchmarks/sfprompt_table.py [--out DIR] [--seeds 0,1,2]
                                        [--set KEY=VALUE ...] [--reuse]
                                        [--write-docs]

Two ``fedsim sweep`` runs (a split family's ``[split]`` keys are unknown to
FedAvg): ``experiments/split_ushape_vit.toml`` with SFPrompt's keys as a
variant, and the same experiment without ``[split]`` under FedAvg (the same
pre-trained ViT, data, clients, rounds, epochs, batch size and optimiser; every
weight trained). ``--reuse`` tabulates the sweeps already in ``--out``.

Prints mean ± std over seeds of the global model's accuracy after the last
round (the server's held-out test set), bytes up and down per round (all
clients), the total over the run (all phases; FedAvg's includes the federated
evaluation's model download, the split families evaluate on the server only)
and its training-phase part, each one's ratio to full fine-tuning, and the
clients' training FLOPs per round (:mod:`client_flops`, counted by PyTorch on
the real segments). Then the analytic byte model (:func:`bytes_model`) next to
the measured ratio, and where SFPrompt would cross over to sending fewer bytes
than full fine-tuning. ``--write-docs`` writes all of it into
``docs/methods/sfprompt-amaq.md`` (block ``sfprompt-full-ft``).
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from pathlib import Path

from cli_run import markdown
from client_flops import per_round
from pages import write_block
from seeds import ROOT, mean_std, read_sweep, seeds_argument, separated, sweep_runs

from fedsim import analysis
from fedsim.core.loading import load_experiment
from fedsim.learn.data import federated_data
from fedsim.learn.models import build_architecture
from fedsim.learn.prompts import keep_count
from fedsim.learn.split import cut_points, split_model

USHAPE = ROOT / "experiments/split_ushape_vit.toml"
NAME = "sfprompt-full-ft"
SFPROMPT = {
    "split.prompts": 4,
    "split.keep-fraction": 0.5,
    "split.local-epochs": 1,
}
SPLIT_VARIANTS = (
    {"name": "split-ushape"},
    {"name": "sfprompt", "strategy.name": "sfprompt", **SFPROMPT},
)
FULL = ({"name": "fedavg-full-ft", "strategy.name": "fedavg"},)
#: ViT-B/16 at 224 x 224 (the paper's model): parameters, tokens, width.
VIT_B = {"params": 86_000_000, "tokens": 197, "width": 768}


def measure(run_dir: Path) -> dict[str, float]:
    """One run: final server accuracy, bytes per round and in all."""
    frame = analysis.load_runs([run_dir])
    server = analysis.round_metric(frame, "accuracy", "server")
    comm = analysis.communication(frame)
    comm = comm[comm["round"] > 0]
    rows = frame[
        frame["client"].isna() & frame["metric"].isin(["bytes-up", "bytes-down"])
    ]
    return {
        "accuracy": float(server.iloc[-1, -1]),
        "up": float(comm["bytes_up"].mean() / 1e6),
        "down": float(comm["bytes_down"].mean() / 1e6),
        "mb": float(comm["bytes"].sum() / 1e6),
        "train_mb": float(rows[rows["phase"] == "train"]["value"].sum() / 1e6),
    }


def bytes_model(
    *, params: int, tokens: int, width: int, kept: float, trained: int
) -> dict[str, float]:
    """Float32 bytes per client per round of the training exchange, ignoring
    message overheads: full fine-tuning sends the model down and up
    (``2 * 4 * params``); SFPrompt sends four ``tokens x width`` tensors per
    kept example (activations up, body output down, its gradient up, the head
    output's gradient down) and its prompts + tail both ways
    (``4 * 4 * kept * tokens * width + 2 * 4 * trained``). SFPrompt sends fewer
    bytes once ``params > 2 * kept * tokens * width + trained``."""
    full = 8.0 * params
    sfprompt = 16.0 * kept * tokens * width + 8.0 * trained
    return {
        "full": full,
        "sfprompt": sfprompt,
        "ratio": sfprompt / full,
        "crossover": 2.0 * kept * tokens * width + trained,
    }


def analysis_lines(measured: dict[str, list[dict[str, float]]]) -> list[str]:
    """The byte model on the packaged ViT (against the measured ratio) and at
    ViT-B/16's dimensions, with the crossover."""
    exp = load_experiment(USHAPE, [])
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    model = build_architecture(exp.model, data.info, exp.seed)
    params = sum(p.numel() for p in model.parameters())
    width = int(exp.model.hidden)
    _, side, _ = data.info.input_shape
    tokens = (side // int(exp.model.patch_size)) ** 2 + 1 + SFPROMPT["split.prompts"]
    tail = split_model(model, cut_points(model, "blocks.0", "pool"))[-1]
    trained = sum(p.numel() for n, p in model.named_parameters() if tail.owns(n))
    trained += SFPROMPT["split.prompts"] * width
    sizes = [len(data.client(i).train) for i in range(exp.federation.clients)]
    kept = sum(keep_count(n, SFPROMPT["split.keep-fraction"]) for n in sizes) / len(
        sizes
    )
    here = bytes_model(
        params=params, tokens=tokens, width=width, kept=kept, trained=trained
    )
    mean = {k: sum(r["train_mb"] for r in v) / len(v) for k, v in measured.items()}
    measured_ratio = mean["sfprompt"] / mean["fedavg-full-ft"]
    b = VIT_B
    # LayerNorm + a 1000-class classifier, and the prompts.
    trained_b = 2 * b["width"] + 1001 * b["width"] + 1000
    trained_b += SFPROMPT["split.prompts"] * b["width"]
    tokens_b = b["tokens"] + SFPROMPT["split.prompts"]
    big = bytes_model(
        params=b["params"],
        tokens=tokens_b,
        width=b["width"],
        kept=kept,
        trained=trained_b,
    )
    kept_b = (b["params"] - trained_b) / (2 * tokens_b * b["width"])
    return [
        f"- Byte model (training exchange, float32, per client per round): full "
        f"fine-tuning `2 x 4 x params`, SFPrompt `4 x 4 x kept x tokens x width + "
        f"2 x 4 x (prompts + tail)`. Packaged ViT: {params:,} parameters, "
        f"{tokens} tokens (with {SFPROMPT['split.prompts']} prompts) x {width} wide, "
        f"{kept:.1f} kept examples per client on average: SFPrompt / full = "
        f"{here['ratio']:.2f} by the model, {measured_ratio:.2f} "
        f"measured (training phase). SFPrompt sends fewer bytes only above "
        f"{here['crossover']:,.0f} parameters at this width and data size "
        f"({here['crossover'] / params:.1f}x the packaged model).",
        f"- The same model at ViT-B/16's dimensions ({b['params'] / 1e6:.0f} M "
        f"parameters, {b['tokens']} tokens, {b['width']} wide; a 1000-class tail) "
        f"with the same {kept:.1f} kept examples per client: SFPrompt / full = "
        f"{big['ratio']:.2f} (analytic, not measured); there SFPrompt sends fewer "
        f"bytes than full fine-tuning while a client keeps at most "
        f"{math.floor(kept_b)} examples per round.",
    ]


def table(measured: dict[str, list[dict[str, float]]], flops: dict[str, float]) -> str:
    """The Markdown table, the separation lines and the byte analysis."""
    base = measured["fedavg-full-ft"]
    base_mb = sum(r["mb"] for r in base) / len(base)
    base_train = sum(r["train_mb"] for r in base) / len(base)

    def ratio(m: list[dict[str, float]], key: str, base: float) -> str:
        return f"{sum(r[key] for r in m) / len(m) / base:.2f}"

    rows = [
        {
            "experiment": f"`{name}`",
            "seeds": str(len(m)),
            "accuracy": mean_std([r["accuracy"] for r in m]),
            "up/round (MB)": mean_std([r["up"] for r in m]),
            "down/round (MB)": mean_std([r["down"] for r in m]),
            "total (MB)": mean_std([r["mb"] for r in m], 2),
            "vs full (total)": ratio(m, "mb", base_mb),
            "training phase (MB)": mean_std([r["train_mb"] for r in m], 2),
            "vs full (training)": ratio(m, "train_mb", base_train),
            "client GFLOP/round": f"{flops[name] / 1e9:.2f}",
            "FLOPs vs full": f"{flops[name] / flops['fedavg-full-ft']:.2f}",
        }
        for name, m in measured.items()
    ]
    lines = [markdown(rows, ("experiment",)), ""]
    names = list(measured)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            apart = separated(
                [r["accuracy"] for r in measured[a]],
                [r["accuracy"] for r in measured[b]],
            )
            verdict = "intervals separate" if apart else "intervals overlap"
            lines.append(f"- accuracy, `{a}` vs `{b}`: {verdict}")
    return "\n".join([*lines, *analysis_lines(measured)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tables"))
    parser.add_argument("--seeds", type=seeds_argument, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--reuse", action="store_true", help="tabulate the sweeps in --out"
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.reuse:
        runs = {
            **read_sweep(args.out / "sfprompt-split"),
            **read_sweep(args.out / "sfprompt-full"),
        }
    else:
        runs = sweep_runs(
            USHAPE,
            SPLIT_VARIANTS,
            args.seeds,
            args.out,
            name="sfprompt-split",
            overrides=args.overrides,
        )
        full = {
            k: v for k, v in tomllib.loads(USHAPE.read_text()).items() if k != "split"
        }
        runs.update(
            sweep_runs(
                full,
                FULL,
                args.seeds,
                args.out,
                name="sfprompt-full",
                overrides=args.overrides,
            )
        )
    measured = {name: [measure(d) for d in dirs] for name, dirs in runs.items()}
    exp = load_experiment(USHAPE, args.overrides)
    flops = per_round(
        exp,
        cut=exp.strategy.options.cut,
        tail=exp.strategy.options.tail,
        prompts=SFPROMPT["split.prompts"],
        keep=SFPROMPT["split.keep-fraction"],
        local_epochs=SFPROMPT["split.local-epochs"],
    )
    text = table(measured, flops)
    print(text)
    if args.write_docs:
        write_block("methods/sfprompt-amaq.md", NAME, text, script=__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
