"""When things go wrong: what fedsim starts dies with it, interrupts stop a run
once, a crashed run says why.

Fast tests with stand-in processes (``sleep``); the end-to-end check with a
real run killed by SIGKILL is in ``test_e2e.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fedsim.core.loading import load_experiment
from fedsim.engine.host import cli, front_door
from fedsim.engine.host.lifeline import GRACE, Lifeline, stop_signals
from fedsim.engine.host.local_simulation import settle

#: A parent holding a Lifeline. It starts a child, which starts a grandchild in
#: a new session and exits (so the grandchild is re-parented before the parent
#: dies, as Ray's processes are when the SuperLink goes), and a sleeper in a new
#: session: no signal of the kernel or the terminal reaches either of them.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, tempfile, time
    from pathlib import Path
    from fedsim.engine.host.lifeline import TICK, Lifeline

    lifeline = Lifeline()
    home = Path(tempfile.mkdtemp(prefix="fedsim-test-home-"))
    (home / "superlink.log").write_text("log")
    lifeline.remove(home)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, time; "
         "p = subprocess.Popen(['sleep', '300'], start_new_session=True); "
         "print(p.pid, flush=True); time.sleep(3)"],
        stdout=subprocess.PIPE, text=True,
    )
    lifeline.watch(child.pid)
    grandchild = int(child.stdout.readline())
    child.wait()
    sleeper = subprocess.Popen(['sleep', '300'], start_new_session=True)
    lifeline.watch(sleeper.pid)
    time.sleep(4 * TICK)  # the watchdog has seen the grandchild by now
    print(grandchild, sleeper.pid, lifeline.process.pid, flush=True)
    print(home, flush=True)
    time.sleep(300)
    """
)


def _gone(pids: list[int], within: float) -> list[int]:
    """The pids still running (zombies aside) after waiting up to ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_sigkill_of_the_parent_stops_what_it_started() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True
    )
    started: list[int] = []
    try:
        assert parent.stdout is not None
        started = [int(pid) for pid in parent.stdout.readline().split()]
        home = Path(parent.stdout.readline().strip())
        grandchild, sleeper, watchdog = started
        # re-parented: no longer a descendant of the parent
        assert grandchild not in {
            p.pid for p in psutil.Process(parent.pid).children(True)
        }
        assert _gone(started, within=0) == started  # all running
        assert home.is_dir()
        parent.kill()
        parent.wait()
        assert _gone(started, within=GRACE + 5) == []
        # the folder it was told to remove (a SuperLink's FLWR_HOME) is gone too
        deadline = time.monotonic() + 5
        while home.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not home.exists()
    finally:
        parent.kill()
        for pid in started:  # only if the test failed
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_closing_the_lifeline_stops_survivors_and_the_watchdog() -> None:
    """A normal end: whatever the runner missed is stopped, then the watchdog
    exits (SIGTERM is ignored here, so it takes the kill after GRACE)."""
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)",
        ]
    )
    lifeline = Lifeline()
    lifeline.watch(stubborn.pid)
    start = time.monotonic()
    lifeline.close()
    assert stubborn.wait(timeout=5) == -signal.SIGKILL
    assert GRACE <= time.monotonic() - start < GRACE + 8
    assert lifeline.process.returncode == 0


def test_the_first_interrupt_raises_later_ones_are_ignored(
    capfd: pytest.CaptureFixture[str],
) -> None:
    previous = signal.getsignal(signal.SIGINT)
    with stop_signals() as signals:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        assert signals.stopping
        os.kill(os.getpid(), signal.SIGINT)  # during the shutdown: ignored
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
    assert "stopping the run; please wait" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is previous


def test_an_interrupt_before_round_one_leaves_a_full_summary(tmp_path: Path) -> None:
    """The ServerApp never wrote summary.json: the runner writes one with the
    experiment's rounds, seed and versions."""
    exp = load_experiment(None, ["rounds=7", "seed=42"])
    reason = "interrupted by the user (Ctrl-C or SIGTERM)"
    outcome = settle(tmp_path, "interrupted", reason, tmp_path / "logs", exp)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == outcome.summary
    assert summary["status"] == "interrupted" and summary["reason"] == reason
    assert summary["rounds"] == 7 and summary["seed"] == 42
    assert summary["rounds_completed"] == 0 and summary["versions"]["flwr"]


def test_ctrl_c_during_preflight_is_one_line_and_exit_130(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def interrupted(exp: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(front_door, "preflight", interrupted)
    code = cli.main(["run", "--out", str(tmp_path / "runs")])
    captured = capsys.readouterr()
    assert code == 130
    assert captured.err.strip().splitlines() == ["fedsim: interrupted"]
    assert "Traceback" not in captured.out
    assert not (tmp_path / "runs").exists()


def test_a_crashed_serverapp_is_failed_with_the_first_exception(
    tmp_path: Path,
) -> None:
    """The cause of a chain of tracebacks is the first exception line; it is in
    the reason's first line (what the CLI prints on stderr)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "flower.log").write_text(
        "INFO: Starting Flower Simulation\n"
        "Traceback (most recent call last):\n"
        '  File "node.py", line 423, in __init__\n'
        "Exception: The current node timed out during startup.\n"
        "The above exception was the direct cause of the following exception:\n"
        "RuntimeError: Simulation Runtime crashed.\n"
    )
    exp = load_experiment(None)
    outcome = settle(tmp_path, None, None, logs, exp)
    first = outcome.summary["reason"].splitlines()[0]
    assert outcome.status == "failed"
    assert "(Exception: The current node timed out during startup.)" in first
    assert "RuntimeError: Simulation Runtime crashed." in outcome.summary["reason"]
