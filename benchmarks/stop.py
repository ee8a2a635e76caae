"""How fast everything a run started goes away when the run is stopped.

Starts ``fedsim run`` (2 clients, MLP, many rounds), waits until Ray's actors
train, then either kills the CLI (``kill``: SIGKILL, nothing of fedsim runs
afterwards) or sends it three Ctrl-Cs 0.5 s apart (``ctrl-c``), and prints one
Markdown row: processes the run had started, seconds until the last of them
was gone, the CLI's exit code and the summary's status.

    python benchmarks/stop.py kill ctrl-c
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from cli_run import markdown

from fedsim.engine.host.processes import living

ARGS = ("rounds=500", "federation.clients=2", "model.name=mlp")


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.Error:
        return ""


def measure(how: str, out: Path) -> dict[str, str]:
    """Run, stop the run ``how`` (``kill`` or ``ctrl-c``) while it trains."""
    cli = subprocess.Popen(
        [sys.executable, "-m", "fedsim", "run"]
        + [arg for pair in ARGS for arg in ("--set", pair)]
        + ["--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[int, psutil.Process] = {}
    while cli.poll() is None:
        for child in psutil.Process(cli.pid).children(recursive=True):
            seen.setdefault(child.pid, child)
        if any("ClientAppActor" in _name(p) for p in seen.values()):
            break
        time.sleep(0.2)
    procs = list(seen.values())
    start = time.monotonic()
    if how == "kill":
        cli.kill()
    else:
        for _ in range(3):
            cli.send_signal(signal.SIGINT)
            time.sleep(0.5)
    while living(procs) and time.monotonic() - start < 120:
        time.sleep(0.1)
    gone = time.monotonic() - start
    _, err = cli.communicate()
    left = living(procs)
    for proc in left:
        proc.kill()
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "stop": how,
        "processes": str(len(procs)),
        "all gone after (s)": f"{gone:.1f}",
        "left after 120 s": str(len(left)),
        "exit code": str(cli.returncode),
        "summary status": summary["status"],
        "traceback": "yes" if "Traceback" in err else "no",
    }


def main() -> None:
    rows = []
    for how in sys.argv[1:] or ["kill", "ctrl-c"]:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(how, Path(tmp)))
    print(markdown(rows, ("stop", "summary status", "traceback")))


if __name__ == "__main__":
    main()
