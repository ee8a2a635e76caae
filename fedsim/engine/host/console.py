"""What ``fedsim run`` shows in a terminal: the progress line and the summary
table of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


class ConsoleDisplay:
    """Rich status line in a terminal (updated in place), plain lines otherwise."""

    def __init__(self, console: Console):
        self.console = console
        self.status = console.status("starting the simulation runtime...")
        if console.is_terminal:
            self.status.start()

    def round(self, server_round: int, rounds: int, line: str) -> None:
        if self.console.is_terminal:
            self.status.update(f"[bold]{line}")
            self.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.status.stop()


def summary_table(summary: dict[str, Any], run_dir: Path) -> Table:
    table = Table(title=f"fedsim run: {summary.get('name', run_dir.name)}")
    table.add_column("field")
    table.add_column("value", justify="right")
    final = summary.get("final", {})
    headline = summary.get("headline", "server")
    # a causal language model has no accuracy: its headline is the perplexity
    quality = "perplexity" if "perplexity" in final else "accuracy"
    rows = [
        ("status", str(summary.get("status"))),
        ("rounds", f"{summary.get('rounds_completed')}/{summary.get('rounds')}"),
        (f"{_HEADLINE[headline]} {quality}", fmt(final.get(quality))),
        (f"{_HEADLINE[headline]} loss", fmt(final.get("loss"))),
        (f"federated {quality}", fmt(final.get(f"evaluate_{quality}"))),
        ("client failures", str(summary.get("failures", 0))),
        ("wall time", f"{summary.get('wall_seconds') or 0:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


#: How the summary table names the headline accuracy and loss.
_HEADLINE = {"server": "server", "evaluate": "clients' local"}


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
