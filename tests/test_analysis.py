"""fedsim.analysis against hand-computed values from fabricated run directories."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tomli_w

from fedsim import analysis
from fedsim.core.loading import load_experiment, to_dict, to_toml
from fedsim.core.rundir import metrics_frame

Row = tuple[int, int | None, str, str, float]


def write_run(
    root: Path,
    dirname: str,
    rows: Sequence[Row] | None,
    *,
    overrides: Sequence[str] = (),
    summary: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A run directory as the recorder leaves it, with the given metric rows."""
    path = root / dirname
    (path / "checkpoints").mkdir(parents=True)
    text = (
        tomli_w.dumps(config) if config else to_toml(load_experiment(None, overrides))
    )
    (path / "config.toml").write_text(text, encoding="utf-8")
    if rows is not None:
        metrics_frame(list(rows)).to_parquet(path / "metrics.parquet", index=False)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return path


def eps(server_round: int, client: int) -> float:
    """Fabricated epsilon of a client after a round (non-decreasing in rounds)."""
    return 0.25 * server_round + 0.4 * client


#: Per-client evaluate accuracy of run "a", rounds 1-4, clients 0-2.
CLIENT_ACC = {
    1: [0.5, 0.6, 0.9],
    2: [0.7, 0.8, 0.85],
    3: [0.8, 0.9, 0.95],
    4: [0.75, 0.85, 0.9],
}


def rows_a() -> list[Row]:
    """4 rounds, 3 clients; client 2 fails training in round 3."""
    acc = {0: 0.10, 1: 0.55, 2: 0.82, 3: 0.88, 4: 0.86}
    loss = {0: 2.30, 1: 1.20, 2: 0.60, 3: 0.45, 4: 0.50}
    fed = {1: 0.62, 2: 0.78, 3: 0.88, 4: 0.84}
    rows: list[Row] = [
        (0, None, "server", "accuracy", acc[0]),
        (0, None, "server", "loss", loss[0]),
        (0, None, "server", "elapsed", 2.0),
    ]
    for r in range(1, 5):
        rows += [
            (r, None, "server", "accuracy", acc[r]),
            (r, None, "server", "loss", loss[r]),
        ]
        up = 0.0
        for c in range(3):
            rows.append((r, c, "evaluate", "accuracy", CLIENT_ACC[r][c]))
            rows.append((r, c, "evaluate", "bytes-down", 100.0))
            rows.append((r, c, "evaluate", "bytes-up", 0.0))
            rows.append((r, c, "train", "bytes-down", 100.0))
            if r == 3 and c == 2:
                rows.append((r, c, "train", "failed", 1.0))
                continue
            rows.append((r, c, "train", "bytes-up", 100.0))
            rows.append((r, c, "train", "epsilon", eps(r, c)))
            up += 100.0
        rows += [
            (r, None, "evaluate", "accuracy", fed[r]),
            (r, None, "evaluate", "bytes-down", 300.0),
            (r, None, "evaluate", "bytes-up", 0.0),
            (r, None, "train", "bytes-down", 300.0),
            (r, None, "train", "bytes-up", up),
            (r, None, "train", "epsilon", 0.5),  # an aggregate, below the max
            (r, None, "server", "elapsed", 2.0 + r),
        ]
    return rows


def rows_b() -> list[Row]:
    """A run that failed after round 2: no evaluate phase, no epsilon."""
    rows: list[Row] = []
    for r, (a, lo, el) in enumerate(
        [(0.1, 2.3, 3.0), (0.3, 1.9, 5.0), (0.45, 1.5, 7.5)]
    ):
        rows += [
            (r, None, "server", "accuracy", a),
            (r, None, "server", "loss", lo),
            (r, None, "server", "elapsed", el),
        ]
        if r:
            rows += [
                (r, None, "train", "bytes-up", 200.0),
                (r, None, "train", "bytes-down", 200.0),
            ]
    return rows


@pytest.fixture
def two_runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(
        root,
        "a-1",
        rows_a(),
        overrides=["name=a", "rounds=4", "seed=3"],
        summary={"status": "completed", "wall_seconds": 12.5},
    )
    write_run(
        root,
        "b-1",
        rows_b(),
        overrides=["name=b", "rounds=4", "data.partitioner=iid"],
        summary={"status": "failed", "wall_seconds": None},
    )
    return root


def test_comparison_matches_hand_computed_values(two_runs: Path) -> None:
    frame = analysis.load_runs(two_runs)
    table = analysis.comparison(frame, target=0.8)
    assert list(table.index) == ["a", "b"]
    a, b = table.loc["a"], table.loc["b"]
    assert a["status"] == "completed" and a["rounds"] == 4 and a["planned_rounds"] == 4
    assert a["final_accuracy"] == pytest.approx(0.86)
    assert a["best_accuracy"] == pytest.approx(0.88) and a["best_round"] == 3
    assert a["rounds_to_target"] == 2
    assert a["final_loss"] == pytest.approx(0.50)
    assert a["federated_accuracy"] == pytest.approx(0.84)
    # train up 300+300+200+300, down 4*300 + evaluate down 4*300
    assert a["bytes_up"] == 1100 and a["bytes_down"] == 2400
    assert a["wall_seconds"] == 12.5
    assert a["epsilon"] == pytest.approx(eps(4, 2))  # 1.8
    # the partial run: as far as it got
    assert b["status"] == "failed" and b["rounds"] == 2 and b["planned_rounds"] == 4
    assert b["final_accuracy"] == pytest.approx(0.45)
    assert b["best_accuracy"] == pytest.approx(0.45) and b["best_round"] == 2
    assert b["rounds_to_target"] is pd.NA
    assert b["final_loss"] == pytest.approx(1.5)
    assert np.isnan(b["federated_accuracy"]) and np.isnan(b["epsilon"])
    assert b["bytes_up"] == 400 and b["bytes_down"] == 400
    assert b["wall_seconds"] == 7.5  # no summary value: the last `elapsed`


@pytest.mark.parametrize(
    ("target", "expected"), [(0.5, 1), (0.82, 2), (0.87, 3), (0.9, None), (0.1, 0)]
)
def test_rounds_to_target(two_runs: Path, target: float, expected: int | None) -> None:
    table = analysis.comparison(analysis.load_runs(two_runs), target=target)
    got = table.loc["a", "rounds_to_target"]
    assert (got is pd.NA) if expected is None else (got == expected)
    assert table.attrs["target"] == target


def test_comparison_of_client_side_accuracy(two_runs: Path) -> None:
    table = analysis.comparison(analysis.load_runs(two_runs), phase="evaluate")
    assert table.loc["a", "final_accuracy"] == pytest.approx(0.84)
    assert table.loc["a", "best_accuracy"] == pytest.approx(0.88)
    assert table.loc["a", "best_round"] == 3
    assert np.isnan(table.loc["b", "final_accuracy"])


def test_load_runs_labels_every_row(two_runs: Path) -> None:
    frame = analysis.load_runs(str(two_runs / "*"))
    assert list(frame.columns) == [
        *analysis.RUN_COLUMNS,
        "round",
        "client",
        "phase",
        "metric",
        "value",
    ]
    assert len(frame) == len(rows_a()) + len(rows_b())
    info = frame.groupby("run", sort=False).first()
    assert list(info.index) == ["a-1", "b-1"]
    assert list(info["label"]) == ["a", "b"]
    assert list(info["strategy"]) == ["fedavg", "fedavg"]
    assert list(info["privacy"]) == ["none", "none"]
    assert list(info["seed"]) == [3, 0]
    assert list(info["partitioner"]) == ["dirichlet", "iid"]
    assert list(info["status"]) == ["completed", "failed"]
    assert list(info["ranks"]) == ["", ""]
    assert frame["client"].dtype == "Int64" and frame["value"].dtype == "float64"


def test_labels_from_differing_settings(tmp_path: Path) -> None:
    same = ["name=quickstart", "rounds=2"]
    write_run(tmp_path, "r1", rows_b(), overrides=[*same, "data.alpha=0.1"])
    write_run(tmp_path, "r2", rows_b(), overrides=[*same, "data.alpha=1.0"])
    # another strategy with PEFT ranks (configs are read, not validated)
    raw = to_dict(load_experiment(None, [*same, "data.alpha=1.0"]))
    raw["strategy"]["name"] = "flora"
    raw["peft"].update(method="lora", ranks=[4, 8])
    write_run(tmp_path, "r3", rows_b(), config=raw)
    frame = analysis.load_runs([tmp_path / "r1", tmp_path / "r2", tmp_path / "r3"])
    info = frame.groupby("run", sort=False).first()
    assert list(info["label"]) == [
        "fedavg, data.alpha=0.1, peft.method=none, peft.ranks=[]",
        "fedavg, data.alpha=1, peft.method=none, peft.ranks=[]",
        "flora, data.alpha=1, peft.method=lora, peft.ranks=[4,8]",
    ]
    assert list(info["ranks"]) == ["", "", "4,8"]
    # identical configs: the run directory names tell them apart
    write_run(tmp_path, "r4", rows_b(), overrides=[*same, "data.alpha=1.0"])
    runs = [analysis.load_run(tmp_path / "r2"), analysis.load_run(tmp_path / "r4")]
    assert analysis.run_labels(runs) == ["r2", "r4"]
    # the same directory name under two parents
    write_run(tmp_path / "x", "r2", rows_b(), overrides=[*same, "data.alpha=1.0"])
    runs = [analysis.load_run(tmp_path / "r2"), analysis.load_run(tmp_path / "x/r2")]
    assert analysis.run_labels(runs) == [f"{tmp_path.name}/r2", "x/r2"]


def test_round_metric_and_partial_runs(two_runs: Path) -> None:
    frame = analysis.load_runs(two_runs)
    wide = analysis.round_metric(frame, "accuracy")
    assert list(wide.columns) == ["a", "b"] and list(wide.index) == [0, 1, 2, 3, 4]
    assert wide["a"].tolist() == pytest.approx([0.10, 0.55, 0.82, 0.88, 0.86])
    assert wide["b"].iloc[:3].tolist() == pytest.approx([0.1, 0.3, 0.45])
    assert wide["b"].iloc[3:].isna().all()
    train_up = analysis.round_metric(frame, "bytes-up", "train", by="run")
    assert train_up["a-1"].tolist() == [300, 300, 200, 300]


def test_client_spread_against_numpy(two_runs: Path) -> None:
    frame = analysis.load_runs(two_runs)
    spread = analysis.client_spread(frame)
    assert list(spread.index) == [("a", r) for r in range(1, 5)]
    for r, values in CLIENT_ACC.items():
        row, v = spread.loc[("a", r)], np.array(values)
        assert row["clients"] == 3
        assert row["mean"] == pytest.approx(v.mean())
        assert row["std"] == pytest.approx(v.std())
        assert row["min"] == v.min() and row["max"] == v.max()
        assert row["q25"] == pytest.approx(np.percentile(v, 25))
        assert row["median"] == pytest.approx(np.median(v))
        assert row["q75"] == pytest.approx(np.percentile(v, 75))
    per_client = analysis.client_metric(frame)
    assert len(per_client) == 12 and set(per_client["client"]) == {0, 1, 2}


def test_communication_and_epsilon_per_round(two_runs: Path) -> None:
    frame = analysis.load_runs(two_runs)
    comm = analysis.communication(frame)
    a = comm[comm["label"] == "a"]
    assert a["round"].tolist() == [0, 1, 2, 3, 4]
    assert a["bytes"].tolist() == [0, 900, 900, 800, 900]
    assert a["cumulative_bytes"].tolist() == [0, 900, 1800, 2600, 3500]
    b = comm[comm["label"] == "b"]
    assert b["cumulative_bytes"].tolist() == [0, 400, 800]
    epsilon = analysis.epsilon_per_round(frame)
    assert list(epsilon.columns) == ["a"]
    # round 3: client 2 (the largest) failed, so the running maximum holds
    expected = [eps(1, 2), eps(2, 2), eps(2, 2), eps(4, 2)]
    assert epsilon["a"].tolist() == pytest.approx(expected)


def test_live_run_without_metrics_yet(tmp_path: Path) -> None:
    path = write_run(tmp_path, "live", None, overrides=["rounds=5"])
    run = analysis.load_run(path)
    assert run.status == "starting" and run.rounds_done == 0 and run.metrics.empty
    (path / "summary.json").write_text('{"status": "running"}')
    metrics_frame(rows_b()).to_parquet(path / "metrics.parquet")
    run = analysis.load_run(path)
    assert run.status == "running" and run.rounds_done == 2
    table = analysis.comparison(analysis.runs_frame([run]))
    assert table.iloc[0]["rounds"] == 2 and table.iloc[0]["planned_rounds"] == 5


def test_folder_of_runs_and_globs(two_runs: Path) -> None:
    (two_runs / "report").mkdir()  # what else lives beside run directories
    (two_runs / "mlflow.db").write_text("")
    assert [p.name for p in analysis.run_paths(two_runs)] == ["a-1", "b-1"]
    assert [p.name for p in analysis.run_paths(str(two_runs / "a-*"))] == ["a-1"]
    assert [
        p.name for p in analysis.run_paths([two_runs / "b-1", two_runs / "a-1"])
    ] == ["b-1", "a-1"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: None, "no such run directory"),
        (lambda p: p.mkdir(), "not a run directory"),
        (
            lambda p: (p.mkdir(), (p / "config.toml").write_text("x=1")),
            "not a run directory",
        ),
        (lambda p: p.write_text("x"), "not a directory"),
    ],
)
def test_not_a_run_directory(tmp_path: Path, damage: Any, message: str) -> None:
    path = tmp_path / "run"
    damage(path)
    with pytest.raises(analysis.RunDirError, match=message):
        analysis.load_run(path)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("config.toml", "name = ", "config.toml: invalid TOML"),
        ("metrics.parquet", "not parquet", "metrics.parquet: unreadable metrics"),
        ("summary.json", "{", "summary.json: invalid JSON"),
        ("summary.json", "[1]", "summary.json: expected a JSON object"),
    ],
)
def test_malformed_run_directory(
    two_runs: Path, file: str, content: str, message: str
) -> None:
    (two_runs / "a-1" / file).write_text(content)
    with pytest.raises(analysis.RunDirError, match=message) as info:
        analysis.load_runs(two_runs)
    assert "\n" not in str(info.value)


def test_metrics_without_the_long_format_columns(two_runs: Path) -> None:
    pd.DataFrame({"round": [0], "value": [1.0]}).to_parquet(
        two_runs / "a-1" / "metrics.parquet"
    )
    with pytest.raises(analysis.RunDirError, match="missing columns client, phase"):
        analysis.load_run(two_runs / "a-1")


def test_no_match(tmp_path: Path) -> None:
    with pytest.raises(analysis.RunDirError, match="matches no run directory"):
        analysis.load_runs(str(tmp_path / "nothing-*"))


def test_human_bytes() -> None:
    assert analysis.human_bytes(999) == "999 B"
    assert analysis.human_bytes(1536) == "1.5 kB"
    assert analysis.human_bytes(2.5e9) == "2.5 GB"
    assert analysis.human_bytes(float("nan")) == "-"


# -- headline phase: runs of families without a global model ----------------------

#: Per-client (equal weights) and aggregated evaluate accuracy and loss of run "c".
C_ACC = {1: ([0.5, 0.7], 0.6), 2: ([0.8, 0.9], 0.85), 3: ([0.7, 0.9], 0.8)}
C_LOSS = {1: ([1.0, 1.2], 1.1), 2: ([0.6, 0.8], 0.7), 3: ([0.7, 0.8], 0.75)}


def rows_c() -> list[Row]:
    """3 rounds, 2 clients, no global model: no `server` rows at all."""
    rows: list[Row] = []
    for r in range(1, 4):
        for metric, table in (("accuracy", C_ACC), ("loss", C_LOSS)):
            per_client, aggregate = table[r]
            rows += [(r, c, "evaluate", metric, v) for c, v in enumerate(per_client)]
            rows.append((r, None, "evaluate", metric, aggregate))
        rows += [
            (r, None, "train", "loss", 0.1 * r),  # never the headline loss
            (r, None, "train", "bytes-up", 50.0),
            (r, None, "train", "bytes-down", 50.0),
        ]
    return rows


def write_c(root: Path, headline: str | None = "evaluate") -> Path:
    summary: dict[str, Any] = {"status": "completed", "wall_seconds": 9.0}
    if headline is not None:
        summary["headline"] = headline
    return write_run(
        root, "c-1", rows_c(), overrides=["name=c", "rounds=3"], summary=summary
    )


def test_headline_evaluate_run_takes_the_clients_evaluation(tmp_path: Path) -> None:
    path = write_c(tmp_path)
    assert analysis.load_run(path).headline == "evaluate"
    frame = analysis.load_runs(path)
    assert set(frame["headline"]) == {"evaluate"}
    table = analysis.comparison(frame, target=0.8)
    c = table.loc["c"]
    assert c["phase"] == "evaluate" and c["rounds"] == 3
    assert c["final_accuracy"] == pytest.approx(0.8)
    assert c["best_accuracy"] == pytest.approx(0.85) and c["best_round"] == 2
    assert c["rounds_to_target"] == 2
    assert c["final_loss"] == pytest.approx(0.75)
    assert c["federated_accuracy"] == pytest.approx(0.8)
    assert c["bytes_up"] == 150 and c["bytes_down"] == 150
    assert table.attrs["phase"] == "evaluate"
    higher = analysis.comparison(frame, target=0.86)
    assert higher.loc["c", "rounds_to_target"] is pd.NA
    wide = analysis.round_metric(frame, "accuracy")
    assert list(wide.index) == [1, 2, 3]
    assert wide["c"].tolist() == pytest.approx([0.6, 0.85, 0.8])
    loss = analysis.round_metric(frame, "loss")
    assert loss["c"].tolist() == pytest.approx([1.1, 0.7, 0.75])
    # naming a phase still means that phase: the run has no server rows
    assert analysis.round_metric(frame, "accuracy", "server").empty
    assert np.isnan(analysis.comparison(frame, phase="server").loc["c", "final_loss"])
    # the plots follow the headline too
    from fedsim.analysis import plots

    fig = plots.accuracy_loss(frame)
    ax_acc, ax_loss = fig.axes
    assert ax_acc.get_ylabel() == "accuracy (evaluate)"
    assert ax_acc.lines[0].get_ydata().tolist() == pytest.approx([0.6, 0.85, 0.8])
    assert ax_loss.lines[0].get_ydata().tolist() == pytest.approx([1.1, 0.7, 0.75])
    fig = plots.accuracy_bytes(frame)
    assert fig.axes[0].lines[0].get_xdata().tolist() == pytest.approx(
        [100e-6, 200e-6, 300e-6]
    )


def test_mixed_headlines_each_run_its_own(two_runs: Path) -> None:
    write_c(two_runs)
    frame = analysis.load_runs(two_runs)
    assert analysis.headline_phases(frame).to_dict() == {
        "a": "server",
        "b": "server",
        "c": "evaluate",
    }
    table = analysis.comparison(frame, target=0.8)
    assert list(table.index) == ["a", "b", "c"]
    assert list(table["phase"]) == ["server", "server", "evaluate"]
    a, b, c = table.loc["a"], table.loc["b"], table.loc["c"]
    # run a as in test_comparison_matches_hand_computed_values: server rows, not
    # its evaluate rows (federated accuracy 0.84, best 0.88 in round 3 too)
    assert a["final_accuracy"] == pytest.approx(0.86)
    assert a["best_accuracy"] == pytest.approx(0.88) and a["best_round"] == 3
    assert a["rounds_to_target"] == 2 and a["final_loss"] == pytest.approx(0.50)
    assert a["federated_accuracy"] == pytest.approx(0.84)
    assert b["final_accuracy"] == pytest.approx(0.45)
    assert b["final_loss"] == pytest.approx(1.5)
    assert c["final_accuracy"] == pytest.approx(0.8)
    assert c["best_accuracy"] == pytest.approx(0.85) and c["best_round"] == 2
    assert c["rounds_to_target"] == 2 and c["final_loss"] == pytest.approx(0.75)
    assert table.attrs["phase"] == "headline"
    caption = analysis.comparison_table(table).caption
    assert caption == "accuracy and loss: server phase for a, b; evaluate phase for c"
    wide = analysis.round_metric(frame, "accuracy")
    assert list(wide.columns) == ["a", "b", "c"] and list(wide.index) == [0, 1, 2, 3, 4]
    assert wide["a"].tolist() == pytest.approx([0.10, 0.55, 0.82, 0.88, 0.86])
    assert np.isnan(wide.loc[0, "c"])
    assert wide["c"].iloc[1:4].tolist() == pytest.approx([0.6, 0.85, 0.8])
    from fedsim.analysis import plots

    ax_acc = plots.accuracy_loss(frame).axes[0]
    assert ax_acc.get_ylabel() == "accuracy (headline)"
    assert [line.get_label() for line in ax_acc.lines] == ["a", "b", "c"]


def test_summary_without_headline_is_a_server_run(two_runs: Path) -> None:
    frame = analysis.load_runs(two_runs)
    assert set(frame["headline"]) == {"server"}
    assert analysis.load_run(two_runs / "a-1").headline == "server"
    table = analysis.comparison(frame, target=0.8)
    explicit = analysis.comparison(frame, target=0.8, phase="server")
    pd.testing.assert_frame_equal(table, explicit)
    assert list(table["phase"]) == ["server", "server"]
    assert table.attrs["phase"] == "server"
    caption = analysis.comparison_table(table).caption
    assert caption == "accuracy and loss: server phase"
    # a frame from before the column existed reads the same
    old = analysis.comparison(frame.drop(columns="headline"), target=0.8)
    pd.testing.assert_frame_equal(old, table)
    pd.testing.assert_frame_equal(
        analysis.round_metric(frame, "accuracy"),
        analysis.round_metric(frame, "accuracy", "server"),
    )
    # a summary without the key, or with a null one, is a server run's: a run with
    # evaluate rows only then has no headline numbers, as before the key existed
    for i, summary in enumerate(["{}", '{"headline": null}']):
        path = write_c(two_runs / f"old-{i}", None)
        (path / "summary.json").write_text(summary)
        run = analysis.load_run(path)
        assert run.headline == "server"
        table = analysis.comparison(analysis.runs_frame([run]))
        assert np.isnan(table.loc["c", "final_accuracy"])
        assert table.loc["c", "federated_accuracy"] == pytest.approx(0.8)


def test_unknown_headline_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_c(tmp_path, "global")
    with pytest.raises(
        analysis.RunDirError,
        match=r"summary.json: headline 'global' is not one of server, evaluate",
    ):
        analysis.load_run(path)


def test_incremental_metrics_file_equals_the_whole_frame(tmp_path: Path) -> None:
    """Each write converts only new rows; the file read back (pandas and the
    analysis API) equals ``metrics_frame(rows).to_parquet`` of all rows, across
    chunk merges and rows with and without a client."""
    from fedsim.core.rundir import MetricsWriter, read_metrics

    rng = np.random.default_rng(0)
    writer = MetricsWriter()
    writer.MERGE_AFTER = 3
    rows: list[tuple[int, int | None, str, str, float]] = []
    whole = tmp_path / "whole"
    whole.mkdir()
    for rnd in range(9):
        for client in [None, *rng.choice(50, size=int(rng.integers(0, 4)))]:
            who = None if client is None else int(client)
            rows.append((rnd, who, "train", "loss", float(rng.random())))
        writer.write(rows, tmp_path / "metrics.parquet")
        metrics_frame(rows).to_parquet(whole / "metrics.parquet", index=False)
        got, want = read_metrics(tmp_path), read_metrics(whole)
        assert got is not None and want is not None
        pd.testing.assert_frame_equal(got, want)
        assert got.dtypes.astype(str).to_dict() == {
            "round": "int64",
            "client": "Int64",
            "phase": "string",
            "metric": "string",
            "value": "float64",
        }
    with pytest.raises(ValueError, match="rows were removed"):
        writer.write(rows[:-1], tmp_path / "metrics.parquet")
