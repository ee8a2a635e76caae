"""``fedsim report`` and fedsim.analysis.plots: the table, PNGs, live runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from test_analysis import rows_a, rows_b, write_run

from fedsim import analysis
from fedsim.analysis import plots
from fedsim.engine.host.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(
        root,
        "a-1",
        rows_a(),
        overrides=["name=a", "rounds=4"],
        summary={"status": "completed", "wall_seconds": 12.5},
    )
    write_run(
        root,
        "b-1",
        rows_b(),
        overrides=["name=b", "rounds=4"],
        summary={"status": "failed", "wall_seconds": None},
    )
    return root


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    assert np.ptp(image[..., :3]) > 0.5  # not a blank canvas


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_prints_the_table_and_writes_every_view(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "png"
    code, text, err = report(capsys, str(runs), "--out", str(out))
    assert code == 0, err
    lines = {
        line.split("│")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("│")
    }
    assert set(lines) == {"a", "b"}
    for cell in (
        "completed",
        "4/4",
        "0.8600",
        "0.8800 (3)",
        "1.1 kB",
        "2.4 kB",
        "12.5 s",
        "1.800",
        "0.8400",
    ):
        assert cell in lines["a"], cell
    for cell in ("failed", "2/4", "0.4500 (2)", "400 B", "7.5 s"):
        assert cell in lines["b"], cell
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{v}.png" for v in plots.VIEWS
    )
    for view in plots.VIEWS:
        assert_png(out / f"{view}.png")
        assert f"wrote {out / view}.png" in text


def test_only_the_requested_views(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "png"
    code, _, err = report(
        capsys,
        str(runs / "a-1"),
        "--out",
        str(out),
        "--plot",
        "client_spread",
        "--plot",
        "epsilon",
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["client_spread.png", "epsilon.png"]


def test_report_on_a_partial_run(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "png"
    code, text, err = report(capsys, str(runs / "b-1"), "--out", str(out))
    assert code == 0, err
    assert "failed" in text and "2/4" in text and "0.4500" in text
    assert "skipped epsilon: no run recorded epsilon" in text
    assert "skipped client_spread: no per-client evaluate accuracy" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_bytes.png",
        "accuracy_loss.png",
    ]


def test_live_view_of_a_running_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = write_run(tmp_path, "live", None, overrides=["name=live", "rounds=5"])
    code, text, _ = report(capsys, str(live), "--out", str(tmp_path / "png"))
    assert code == 0
    assert f"{live}: no round recorded yet (starting)" in text
    # the ServerApp has closed rounds 0-2 of 5
    (live / "summary.json").write_text('{"status": "running", "wall_seconds": 4.0}')
    write_run(tmp_path, "tmp", rows_b())  # metrics written by the recorder
    (tmp_path / "tmp" / "metrics.parquet").rename(live / "metrics.parquet")
    code, text, _ = report(capsys, str(live), "--out", str(tmp_path / "png"))
    assert code == 0
    (row,) = [line for line in text.splitlines() if line.startswith("│")]
    assert "running" in row and "2/5" in row and "0.4500" in row


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing"], "missing: no such run directory"),
        (["."], "not a run directory"),
        (["runs", "--target", "0"], "--target: 0.0 must be in (0, 1]"),
        (["runs", "--plot", "pie"], "--plot: 'pie' is not a view"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    runs: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    (runs.parent / "runs" / "note.txt").write_text("not a run")
    monkeypatch.chdir(runs.parent)
    code, _, err = report(capsys, *args)
    assert code == 2
    assert err.startswith("fedsim: error: ") and err.count("\n") == 1
    assert message in err


def test_malformed_run_directory_from_the_command_line(runs: Path) -> None:
    (runs / "a-1" / "metrics.parquet").write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "report", str(runs / "a-1")],
        capture_output=True,
        text=True,
        cwd=runs,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("fedsim: error: ") and proc.stderr.count("\n") == 1
    assert "metrics.parquet: unreadable metrics" in proc.stderr
    assert not (runs / "report").exists()


def test_plotted_lines_are_the_recorded_values(runs: Path) -> None:
    frame = analysis.load_runs(runs)
    fig = plots.accuracy_loss(frame)
    acc_ax, loss_ax = fig.axes
    lines = {line.get_label(): line for line in acc_ax.get_lines()}
    assert list(lines) == ["a", "b"]
    assert np.asarray(lines["a"].get_ydata()).tolist() == pytest.approx(
        [0.10, 0.55, 0.82, 0.88, 0.86]
    )
    assert np.asarray(lines["b"].get_xdata()).tolist() == [0, 1, 2]
    # same colour per run in every figure
    bytes_lines = {
        ln.get_label(): ln for ln in plots.accuracy_bytes(frame).axes[0].lines
    }
    assert np.asarray(bytes_lines["a"].get_xdata()).tolist() == pytest.approx(
        [0, 0.0009, 0.0018, 0.0026, 0.0035]
    )
    assert bytes_lines["b"].get_color() == lines["b"].get_color()
    spread = plots.client_spread(frame)
    assert [ax.get_title() for ax in spread.axes if ax.get_visible()] == ["a"]
    with pytest.raises(plots.NoData):
        plots.epsilon(frame[frame["label"] == "b"])


def test_report_on_a_real_run(small_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    run_dir = small_run.run_dir
    final = json.loads((run_dir / "summary.json").read_text())["final"]["accuracy"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "report",
            str(run_dir),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{final:.4f}" in proc.stdout and "completed" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy_bytes.png",
        "accuracy_loss.png",
        "client_spread.png",
    ]
    for path in tmp_path.iterdir():
        assert_png(path)
