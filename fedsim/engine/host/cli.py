"""``fedsim`` command line: ``run``, ``sweep``, ``list``, ``report``,
``supernodes``.

Exit codes: 0 run completed (or stopped cleanly, e.g. privacy budget spent), 1 run
failed, 2 invalid input (one line on stderr, no
traceback, nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedsim import __version__
from fedsim.core import registry
from fedsim.core.errors import ConfigError
from fedsim.engine.host import front_door
from fedsim.engine.host.console import ConsoleDisplay, fmt, summary_table

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsim",
        description="Federated-learning simulation on Flower and Ray.",
    )
    parser.add_argument("--version", action="version", version=f"fedsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment (default: the quickstart)")
    run.add_argument("experiment", nargs="?", help="experiment TOML file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. --set data.alpha=0.1 (repeatable)",
    )
    run.add_argument(
        "--out", default="runs", help="where run directories go (default: ./runs)"
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted or failed run from its last completed round",
    )
    run.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the clients on this existing Ray cluster (overrides "
        "resources.ray-address; fedsim installed on every node)",
    )
    _superlink_options(run)
    run.add_argument(
        "--remote-out",
        metavar="DIR",
        help="with --superlink: --out as the SuperLink's host sees it, e.g. "
        "/work/runs for docker/compose.yaml (default: the same path)",
    )
    sweep = sub.add_parser(
        "sweep",
        help="run a grid of experiments (start-up paid once); re-run to finish one",
    )
    sweep.add_argument("sweep", help="experiment TOML with [grid] and/or [[variants]]")
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key of the base experiment (repeatable)",
    )
    sweep.add_argument(
        "--out",
        default="runs",
        help="the sweep directory is OUT/<sweep file name> (default: ./runs)",
    )
    sub.add_parser("list", help="list strategies, datasets, models, privacy mechanisms")
    nodes = sub.add_parser(
        "supernodes",
        help="list a SuperLink's SuperNodes; register SuperNode public keys",
    )
    _superlink_options(nodes, required=True)
    nodes.add_argument(
        "--register",
        action="append",
        default=[],
        metavar="KEY.pub",
        help="register a SuperNode's public key (docker/certs.sh makes them) with "
        "a SuperLink that runs with --enable-supernode-auth (repeatable)",
    )
    report = sub.add_parser(
        "report",
        help="compare runs: print a table, write PNG plots (works on running runs)",
    )
    report.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories, or folders holding them (e.g. runs)",
    )
    report.add_argument(
        "--out", default="report", help="where the PNGs go (default: ./report)"
    )
    report.add_argument(
        "--target",
        type=float,
        default=0.8,
        help="accuracy for the 'rounds to' column (default: 0.8)",
    )
    report.add_argument(
        "--plot",
        dest="views",
        action="append",
        metavar="VIEW",
        help="write only this plot (repeatable): accuracy_loss, accuracy_bytes, "
        "epsilon, client_spread (default: all)",
    )
    return parser


def _superlink_options(
    parser: argparse.ArgumentParser, *, required: bool = False
) -> None:
    """``--superlink HOST:PORT`` and how to trust it."""
    parser.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        required=required,
        help="an existing SuperLink (e.g. docker/compose.yaml's 127.0.0.1:9093) "
        "instead of a private simulation",
    )
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument(
        "--root-certificates",
        metavar="FILE",
        type=Path,
        help="PEM CA certificate(s) that verify the SuperLink's TLS certificate "
        "(default: the system's trust store)",
    )
    trust.add_argument(
        "--insecure",
        action="store_true",
        help="connect without TLS (only to a SuperLink started with --insecure)",
    )


def _connection(args: argparse.Namespace) -> Any:
    """The :class:`fedsim.engine.host.remote.Connection` the options describe."""
    from fedsim.engine.host.remote import Connection

    return Connection(args.superlink, args.root_certificates, args.insecure)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    """``fedsim run``: :func:`fedsim.engine.host.front_door.start` with the
    options, a summary table, an exit code. The run directory is locked while
    this process runs in it (:mod:`fedsim.core.locking`)."""
    from fedsim.engine.host.local_simulation import LOGS_DIR

    request = front_door.Request(
        args.experiment,
        args.overrides,
        args.out,
        resume=args.resume,
        ray_address=args.ray_address,
        superlink=args.superlink,
        root_certificates=args.root_certificates,
        insecure=args.insecure,
        remote_out=args.remote_out,
    )

    def announce(started: front_door.Started) -> None:
        if started.resumed:
            line = f"resuming after round {started.done}: {started.run_dir}"
            console.print(line, highlight=False)
        else:
            console.print(f"run directory: {started.run_dir}")

    started, outcome = front_door.start(
        request, lambda exp: ConsoleDisplay(console), announce=announce
    )
    run_dir = started.run_dir
    console.print(summary_table(outcome.summary, run_dir))
    reason = outcome.summary.get("reason")
    if outcome.status == "stopped" and reason:
        console.print(f"stopped: {reason}", highlight=False)
    console.print(f"run directory: {run_dir}", highlight=False)
    if outcome.status in ("completed", "stopped"):
        return EXIT_OK
    first = str(reason or "no reason recorded").splitlines()[0]
    log = run_dir / LOGS_DIR / "flower.log"
    print(f"fedsim: run {outcome.status}: {first} (log: {log})", file=sys.stderr)
    return EXIT_INTERRUPTED if outcome.status == "interrupted" else EXIT_FAILED


def cmd_supernodes(args: argparse.Namespace, console: Console) -> int:
    """Register the given public keys, then list the SuperNodes and their status."""
    from fedsim.engine.host.remote import register_supernode, supernodes
    from fedsim.engine.host.superlink import SimulationError

    connection = _connection(args)
    try:
        for key in args.register:
            node_id = register_supernode(connection, Path(key))
            line = f"registered {key}: node {node_id}"
            console.print(line, highlight=False, soft_wrap=True)
        nodes = supernodes(connection)
    except SimulationError as err:
        print(f"fedsim: {err}", file=sys.stderr)
        return EXIT_FAILED
    table = Table(title=f"SuperNodes of {connection.address}")
    table.add_column("node")
    table.add_column("status")
    for node in nodes:
        table.add_row(str(node["node-id"]), str(node["status"]))
    console.print(table)
    online = sum(node["status"] == "online" for node in nodes)
    console.print(f"online: {online}", highlight=False)
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    """Validate the whole sweep, run what is left, print a table of its runs."""
    from fedsim.engine.host.cluster import note_ignored
    from fedsim.engine.host.local_simulation import read_summary
    from fedsim.engine.host.progress import PlainDisplay
    from fedsim.engine.host.sweep import execute, plan

    work = plan(args.sweep, args.overrides, args.out)
    note_ignored(work.points[0].experiment.resources.ray_address if work.points else "")
    total = len(work.points)
    done = total - len(work.todo)
    console.print(
        f"sweep directory: {work.directory} ({total} experiments, {done} done)",
        highlight=False,
        soft_wrap=True,
    )
    outcomes = execute(
        work,
        display=lambda p: PlainDisplay(f"[{p.index + 1}/{total}] {p.label}: "),
    )
    table = Table(title=f"fedsim sweep: {work.source.name}")
    for column in ("#", "experiment", "status", "accuracy", "rounds"):
        table.add_column(column, justify="right" if column != "experiment" else "left")
    for point in work.points:
        summary = read_summary(work.run_dir(point))
        final = summary.get("final", {})
        table.add_row(
            str(point.index),
            point.label,
            str(summary.get("status", "pending")),
            fmt(final.get("accuracy")),
            f"{summary.get('rounds_completed', 0)}/{point.experiment.rounds}",
        )
    console.print(table)
    console.print(f"sweep directory: {work.directory}", highlight=False, soft_wrap=True)
    statuses = {o.status for o in outcomes}
    if "interrupted" in statuses:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if statuses - {"completed", "stopped"} else EXIT_OK


def cmd_list(console: Console) -> int:
    sections: list[tuple[str, Mapping[str, Any]]] = [
        ("strategies", registry.families()),
        ("datasets", registry.DATASETS),
        ("partitioners", registry.PARTITIONERS),
        ("models", registry.models()),
        ("privacy mechanisms", registry.PRIVACY),
    ]
    for title, table in sections:
        out = Table(title=title, title_justify="left", show_header=False)
        out.add_column("name", style="bold")
        out.add_column("description")
        for name, entry in table.items():
            out.add_row(name, entry.summary)
        console.print(out)
    return EXIT_OK


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Comparison table of the runs, and one PNG per plot view in ``--out``."""
    from fedsim import analysis
    from fedsim.analysis import plots
    from fedsim.engine.server.run_recorder import check_out

    if not 0 < args.target <= 1:
        raise ConfigError(f"--target: {args.target!r} must be in (0, 1]")
    check_out(args.out, "--out")  # a folder for the plots, not a file
    views = args.views or list(plots.VIEWS)
    unknown = [v for v in views if v not in plots.VIEWS]
    if unknown:
        allowed = ", ".join(plots.VIEWS)
        problem = f"{unknown[0]!r} is not a view; choose from {allowed}"
        raise ConfigError(f"--plot: {problem}")
    runs = [analysis.load_run(path) for path in analysis.run_paths(args.run_dirs)]
    frame = analysis.runs_frame(runs)
    if not console.is_terminal:  # a file or a pipe: keep every column whole
        console = Console(width=max(console.width, 160))
    if not frame.empty:
        table = analysis.comparison(frame, target=args.target)
        console.print(analysis.comparison_table(table))

    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)

    for run in runs:
        if run.metrics.empty:
            say(f"{run.path}: no round recorded yet ({run.status})")
    written = plots.write_plots(frame, args.out, views)
    for path in written.files.values():
        say(f"wrote {path}")
    for view, why in written.skipped.items():
        say(f"skipped {view}: {why}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    try:
        if args.command == "list":
            return cmd_list(console)
        if args.command == "report":
            return cmd_report(args, console)
        if args.command == "sweep":
            return cmd_sweep(args, console)
        if args.command == "supernodes":
            return cmd_supernodes(args, console)
        return cmd_run(args, console)
    except (ConfigError, registry.FamilyError) as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before a run started, or after it ended
        print("fedsim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
