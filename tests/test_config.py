"""Experiment files -> frozen config objects; bad input -> one-line errors."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import Experiment
from fedsim.core.loading import (
    from_run_config,
    load_experiment,
    parse_override,
    schema,
    to_run_config,
    to_toml,
)
from fedsim.engine.host.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_quickstart_defaults() -> None:
    exp = load_experiment(None)
    assert exp.federation.clients == 10
    assert exp.data.dataset == "digits"
    assert exp.data.partitioner == "dirichlet" and exp.data.alpha == 0.5
    assert exp.model.name == "cnn" and exp.strategy.name == "fedavg"
    with pytest.raises(dataclasses.FrozenInstanceError):
        exp.rounds = 3  # type: ignore[misc]


def test_file_and_overrides_are_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'name = "t"\nrounds = 4\n[federation]\nclients = 3\n[data]\nalpha = 2\n',
    )
    exp = load_experiment(
        path,
        [
            "rounds=7",
            "data.alpha=0.1",
            "strategy.name=flora",  # bare string
            'model.name="mlp"',  # TOML string
            'peft.method="lora"',
            "peft.ranks=[4, 2]",
            "federation.fraction-train=1",  # int where a float is expected
        ],
    )
    assert exp.name == "t" and exp.rounds == 7 and exp.federation.clients == 3
    assert exp.data.alpha == 0.1 and isinstance(exp.data.alpha, float)
    assert exp.model.name == "mlp"
    assert exp.peft.ranks == (4, 2)
    assert exp.federation.fraction_train == 1.0


def test_round_trips() -> None:
    exp = load_experiment(
        None,
        ["strategy.name=flora", "peft.method=lora", "peft.ranks=[16, 8, 4]", "seed=3"],
    )
    assert from_run_config(to_run_config(exp)) == exp
    assert all(
        isinstance(v, (bool, int, float, str)) for v in to_run_config(exp).values()
    )


def test_resolved_toml_reloads_to_the_same_experiment(tmp_path: Path) -> None:
    lora = ["strategy.name=flora", "peft.method=lora", "peft.ranks=[2, 1]"]
    exp = load_experiment(None, ["rounds=2", *lora])
    path = write(tmp_path, to_toml(exp))
    assert load_experiment(path) == exp


def test_pyproject_flower_config_matches_quickstart() -> None:
    """`flwr run .` from a checkout runs the packaged quickstart."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedsim.engine.server.server_app:app",
        "clientapp": "fedsim.engine.client.client_app:app",
    }
    assert app["config"] == {**to_run_config(load_experiment(None)), "run-dir": ""}


BAD = [
    (["rounds=0"], "rounds: 0 must be >= 1"),
    (["federation.clients=0"], "federation.clients: 0 must be >= 1"),
    (
        ["federation.fraction-train=0"],
        "federation.fraction-train: 0.0 must be in (0, 1]",
    ),
    (["federation.fraction-evaluate=1.5"], "federation.fraction-evaluate: 1.5 must be"),
    (["train.lr=0"], "train.lr: 0.0 must be > 0"),
    (["train.lr=-1"], "train.lr: -1.0 must be > 0"),
    (["train.lr=nan"], "train.lr: expected a finite number"),
    (["rounds=2.5"], "rounds: expected an integer, got 2.5"),
    (["rounds=true"], "rounds: expected an integer, got True"),
    (["rounds=five"], "rounds: expected an integer, got 'five'"),
    (["data.alhpa=1"], "data.alhpa: unknown key; did you mean 'data.alpha'?"),
    (["federaton.clients=3"], "did you mean 'federation.clients'?"),
    (["bogus=1"], "bogus: unknown key"),
    (["strategy.name=fedsgd"], "strategy.name: 'fedsgd' is not registered; choose"),
    (["data.dataset=mnist"], "data.dataset: 'mnist' is not registered; choose one of"),
    (
        ["model.name=resnet"],
        "model.name: 'resnet' is not registered; choose one of: cnn",
    ),
    (["data.partitioner=shards"], "data.partitioner: 'shards' is not registered"),
    (["train.optimizer=rmsprop"], "train.optimizer: 'rmsprop' is not allowed"),
    (["peft.ranks=[4, 0]"], "peft.ranks"),
    (["peft.ranks=4"], "peft.ranks: expected a list"),
    (["federation.min-replies=11"], "federation.min-replies: 11 must be <="),
    (["data.dataset=file"], "data.path: required"),
    (["federation.failure-rate=1"], "federation.failure-rate: 1.0 must be in [0, 1)"),
    (["resources.num-gpus=-1"], "resources.num-gpus: -1.0 must be >= 0"),
    (["rounds"], "--set 'rounds': expected KEY=VALUE"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_experiment(write(tmp_path, "rounds = = 3"))
    with pytest.raises(ConfigError, match="federation.clients: expected an integer"):
        load_experiment(write(tmp_path, '[federation]\nclients = "many"\n'))


KEYS = sorted(schema())


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(KEYS),
    value=st.one_of(
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.booleans(),
        st.lists(st.integers(-3, 20), max_size=4),
    ),
)
def test_any_value_is_accepted_or_rejected_with_one_line(
    key: str, value: object
) -> None:
    """Every value for every key either validates or raises a one-line error
    that names a key; nothing else escapes."""
    try:
        result = load_experiment(None, [f"{key}={_toml(value)}"])
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message
        assert message.split(":")[0].split("[")[0] in KEYS  # a list item: key[i]
    else:
        assert isinstance(result, Experiment)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return str(value).replace("True", "true").replace("False", "false")


def test_parse_override_keeps_equals_in_values() -> None:
    assert parse_override("data.path=a=b.csv") == ("data.path", "a=b.csv")
    assert parse_override("rounds = 3") == ("rounds", 3)


def _csv(tmp: Path, text: str) -> Path:
    path = tmp / "table.csv"
    path.write_text(text, encoding="utf-8")
    return path


def _table(rows: int = 40, **cells: dict[int, str]) -> str:
    """CSV text: features f1, f2 and a two-class label; ``cells`` overrides
    cells by column and row (``f2={3: ""}``: row 3 of f2 empty)."""
    lines = ["f1,f2,label"]
    for i in range(rows):
        row = {
            "f1": f"{i / rows:.3f}",
            "f2": f"{(i % 7) / 7:.3f}",
            "label": "ab"[i % 2],
        }
        for column, changes in cells.items():
            row[column] = changes.get(i, row[column])
        lines.append(",".join(row.values()))
    return "\n".join(lines) + "\n"


def _file_data(text: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        path = _csv(tmp, text)
        return [
            "run",
            *_sets("data.dataset=file", f"data.path={path}", "model.name=mlp"),
        ]

    return setup


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def _out_file(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["run", "--out", str(tmp / "afile")]


def _out_under_file(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["run", "--out", str(tmp / "afile" / "runs")]


def _out_not_writable(tmp: Path) -> list[str]:
    if os.geteuid() != 0:
        locked = tmp / "locked"
        locked.mkdir(mode=0o500)
        return ["run", "--out", str(locked / "runs")]
    if not Path("/sys/kernel").is_dir():
        pytest.skip("as root, a folder nobody may write needs Linux's /sys")
    return ["run", "--out", "/sys/fedsim-runs"]  # sysfs: mkdir is refused


def _experiment_dir(tmp: Path) -> list[str]:
    (tmp / "experiments").mkdir()
    return ["run", str(tmp / "experiments")]


def _args(*args: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(args)


#: (case, arguments given a scratch folder, text the one-line error must hold)
CLI_BAD: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("rounds", _args("run", "--set", "rounds=0"), "rounds: 0 must be >= 1"),
    ("strategy", _args("run", "--set", "strategy.name=nope"), "strategy.name:"),
    ("missing-file", _args("run", "missing.toml"), "experiment file not found"),
    ("experiment-dir", _experiment_dir, "is a directory; give a TOML file"),
    (
        "cnn-on-vectors",
        _args("run", "--set", "model.name=cnn", "--set", "data.dataset=synthetic"),
        "model.name",
    ),
    ("cpus", _args("run", "--set", "resources.num-cpus=512"), "resources.num-cpus"),
    ("gpus", _args("run", "--set", "resources.num-gpus=999"), "resources.num-gpus"),
    (
        "unknown-key",
        _args("run", "--set", "data.q9x8w7=1"),
        "data.q9x8w7: unknown key; [data] keys: dataset, partitioner, alpha",
    ),
    (
        "unknown-table",
        _args("run", "--set", "zzzzzz.q=1"),
        "there is no [zzzzzz] table; tables: federation, data, model",
    ),
    ("out-is-a-file", _out_file, "--out: "),
    ("out-under-a-file", _out_under_file, "which is a file"),
    ("out-not-writable", _out_not_writable, "--out: "),
    ("name-escapes", _args("run", "--set", "name=../escape"), "name: '../escape'"),
    ("name-nested", _args("run", "--set", "name=a/b"), "name: 'a/b' must be a plain"),
    ("name-empty", _args("run", "--set", 'name=""'), "name: '' must not be empty"),
    ("csv-empty", _file_data(""), "table.csv is empty"),
    ("csv-header-only", _file_data("f1,f2,label\n"), "table.csv has no rows"),
    (
        "csv-nan-features",
        _file_data(_table(f1={5: ""}, f2={3: "nan"})),
        "empty (NaN) feature values in column(s) 'f1', 'f2'",
    ),
    (
        "csv-nan-labels",
        _file_data(_table(label={7: ""})),
        "has 1 empty labels (first in row 7",
    ),
    (
        "csv-one-class",
        _file_data(_table(label=dict.fromkeys(range(40), "a"))),
        "holds 1 class; a classifier needs at least 2",
    ),
    (
        "csv-stray-text",
        _file_data(_table(f2={11: "n/a?", 12: "x"})),
        "holds numbers but row 11 (0-based) holds 'n/a?'",
    ),
]


@pytest.mark.parametrize(
    ("setup", "message"),
    [pytest.param(setup, message, id=case) for case, setup, message in CLI_BAD],
)
def test_cli_bad_input_exits_2_without_traceback_or_files(
    setup: Callable[[Path], list[str]],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each case: exit 2, one line on stderr naming the key or path, no
    traceback (an exception escaping ``main`` fails the test), nothing written
    (the scratch folder holds what the case made, nothing more)."""
    monkeypatch.chdir(tmp_path)
    args = setup(tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "runs")]
    before = sorted(tmp_path.rglob("*"))
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: "), captured.err
    assert message in lines[0]
    assert sorted(tmp_path.rglob("*")) == before
    assert not Path("/sys/fedsim-runs").exists()
