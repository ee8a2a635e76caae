"""Progress of a run as it happens: read from the run directory, shown by a
display (a notebook bar in Jupyter, one line per round elsewhere; the CLI's
own in :mod:`fedsim.engine.host.console`)."""

from __future__ import annotations

import html
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from fedsim.core.experiment import Experiment
from fedsim.core.rundir import ATTACK_PSNR, AUDIT_PHASE, read_metrics
from fedsim.engine.server.run_recorder import headline_of


def audit_note(frame: Any, server_round: int) -> str:
    """The privacy audit's phase of a round, for its progress line: the mean
    ``attack-psnr`` and the attack's seconds ('' when the round was not
    audited)."""
    rows = frame[(frame["round"] == server_round) & frame["client"].isna()]
    psnr = rows[(rows["phase"] == "train") & (rows["metric"] == ATTACK_PSNR)]
    if psnr.empty:
        return ""
    spent = rows[(rows["phase"] == AUDIT_PHASE) & (rows["metric"] == "seconds")]
    seconds = float(spent["value"].iloc[0]) if len(spent) else float("nan")
    value = float(psnr["value"].iloc[0])
    return f"  audit: attack-psnr {value:.2f} dB ({seconds:.1f}s)"


class Display(Protocol):
    """Shows one line per closed round."""

    def round(self, server_round: int, rounds: int, line: str) -> None: ...

    def close(self) -> None: ...


class Progress:
    """Reads closed rounds from the run directory and hands them to a display."""

    def __init__(
        self, display: Display, run_dir: Path, exp: Experiment, *, done: int = -1
    ):
        self.display = display
        self.run_dir = run_dir
        self.rounds = exp.rounds
        self.headline = headline_of(exp)
        self.start = time.monotonic()
        #: The last round shown (a resumed run's rounds before it are not shown).
        self.done = done

    def poll(self) -> None:
        frame = read_metrics(self.run_dir)
        if frame is None:
            return
        closed = frame[(frame["phase"] == "server") & frame["client"].isna()]
        shown = frame[(frame["phase"] == self.headline) & frame["client"].isna()]
        for rnd in sorted(int(r) for r in closed["round"].unique()):
            if rnd <= self.done:
                continue
            rows = shown[shown["round"] == rnd].set_index("metric")["value"]
            nan = float("nan")
            # a causal language model has no accuracy: it reports perplexity
            quality = (
                "accuracy"
                if "accuracy" in rows or "perplexity" not in rows
                else "perplexity"
            )
            line = (
                f"round {rnd:>3}/{self.rounds}"
                f"  {quality} {rows.get(quality, nan):.4f}"
                f"  loss {rows.get('loss', nan):.4f}"
                f"  elapsed {time.monotonic() - self.start:6.1f}s"
            ) + audit_note(frame, rnd)
            self.done = rnd
            self.display.round(rnd, self.rounds, line)

    def close(self) -> None:
        self.display.close()


class PlainDisplay:
    """One printed line per round (scripts, pipes, log files)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def round(self, server_round: int, rounds: int, line: str) -> None:
        print(f"{self.prefix}{line}", flush=True)

    def close(self) -> None:
        """Printed lines need no closing."""


class NotebookDisplay:
    """An HTML ``<progress>`` bar and the latest round's line, updated in place
    in the notebook's output (IPython's display handles; no widgets needed)."""

    def __init__(self, title: str):
        from IPython.display import HTML, display

        self._html = HTML
        self.title = title
        self.handle = display(HTML(self._render(0, 1, "starting...")), display_id=True)

    def _render(self, done: int, total: int, line: str) -> str:
        return (
            f"<div><b>{html.escape(self.title)}</b> "
            f'<progress value="{done}" max="{total}" style="width:30ex"></progress> '
            f"<code>{html.escape(line)}</code></div>"
        )

    def round(self, server_round: int, rounds: int, line: str) -> None:
        if self.handle is not None:
            self.handle.update(self._html(self._render(server_round, rounds, line)))

    def close(self) -> None:
        """The bar stays in the output with the last round shown."""


class QuietDisplay:
    """Shows nothing (``progress=False``)."""

    def round(self, server_round: int, rounds: int, line: str) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ipython = shell.get_ipython()  # type: ignore[attr-defined]
    return ipython is not None and type(ipython).__name__ == "ZMQInteractiveShell"


def default_display(title: str) -> Display:
    """A notebook bar in Jupyter, printed lines elsewhere."""
    return NotebookDisplay(title) if in_notebook() else PlainDisplay()
