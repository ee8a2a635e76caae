"""``fedsim.run`` from Python, and a runner that works from any environment."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

import fedsim
from fedsim.core.errors import ConfigError
from fedsim.core.rundir import METRICS_FILE
from fedsim.engine.host.progress import NotebookDisplay, PlainDisplay
from tests.runs import SMALL, CliRun, console_script_env

TIMING = ("seconds", "elapsed")


def untimed(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path / METRICS_FILE)
    frame = frame[~frame["metric"].isin(TIMING)]
    keys = ["round", "client", "phase", "metric"]
    return frame.sort_values(keys).reset_index(drop=True)


def test_bad_input_raises_the_cli_s_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.alhpa: unknown key"):
        fedsim.run(overrides=["data.alhpa=0.1"], out=tmp_path)
    assert not any(tmp_path.iterdir())


def test_notebook_display_is_an_html_progress_bar() -> None:
    pytest.importorskip("IPython")
    display = NotebookDisplay("quickstart")
    html = display._render(3, 20, "round   3/20  accuracy 0.5000")
    assert '<progress value="3" max="20"' in html and "\x1b" not in html
    assert "round   3/20" in html


@pytest.mark.slow
def test_run_returns_the_run_the_cli_writes(
    small_run: CliRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same experiment through the Python API and through the CLI (another
    process, another run): the same rows, timings aside — the same seed gives
    the same metrics."""
    run = fedsim.run(overrides=list(SMALL), out=tmp_path)
    assert run.status == "completed" and run.path.parent == tmp_path
    assert "round   3/3" in capsys.readouterr().out  # plain progress lines
    pd.testing.assert_frame_equal(untimed(run.path), untimed(small_run.run_dir))


@pytest.mark.slow
def test_console_script_runs_without_its_environment_on_path(small_run: CliRun) -> None:
    """``/path/to/venv/bin/fedsim run`` from a shell where the venv is not
    activated: the SuperLink must still find Flower's executables. The shared
    small run is started that way (``tests/conftest.py``); here: that it was,
    and that it completed."""
    script, _ = console_script_env()
    assert small_run.argv[:2] == (str(script), "run") and small_run.env is not None
    assert str(script.parent) not in small_run.env["PATH"].split(os.pathsep)
    assert "VIRTUAL_ENV" not in small_run.env
    assert small_run.returncode == 0, small_run.stdout + small_run.stderr
    assert "completed" in small_run.stdout


def test_plain_display_prints_a_line_per_round(
    capsys: pytest.CaptureFixture[str],
) -> None:
    PlainDisplay("[1/2] ").round(1, 2, "round   1/2")
    assert capsys.readouterr().out == "[1/2] round   1/2\n"


def test_progress_line_shows_perplexity_where_there_is_no_accuracy(
    tmp_path: Path,
) -> None:
    """A causal language model's rounds report perplexity, not ``accuracy nan``;
    a classifier's line keeps its accuracy."""
    from fedsim.core.loading import load_experiment
    from fedsim.engine.host.progress import Progress
    from fedsim.engine.server.run_recorder import headline_of

    exp = load_experiment(Path(fedsim.__file__).parent / "quickstart.toml")
    lines: list[str] = []

    class Lines:
        def round(self, server_round: int, rounds: int, line: str) -> None:
            lines.append(line)

        def close(self) -> None:
            pass

    def rows(metrics: dict[str, float]) -> pd.DataFrame:
        phases = {"server", headline_of(exp)}
        return pd.DataFrame(
            [
                {"round": 1, "phase": p, "client": None, "metric": m, "value": v}
                for p in phases
                for m, v in metrics.items()
            ]
        )

    rows({"loss": 2.0, "perplexity": 7.389}).to_parquet(tmp_path / METRICS_FILE)
    Progress(Lines(), tmp_path, exp).poll()
    rows({"loss": 0.5, "accuracy": 0.9}).to_parquet(tmp_path / METRICS_FILE)
    Progress(Lines(), tmp_path, exp).poll()
    assert "perplexity 7.3890" in lines[0] and "accuracy" not in lines[0]
    assert "accuracy 0.9000" in lines[1]
