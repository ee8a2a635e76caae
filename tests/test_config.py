"""Experiment files -> frozen config objects; bad input -> one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
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
            "strategy.name=fedavg",  # bare string
            'model.name="mlp"',  # TOML string
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
    exp = load_experiment(None, ["peft.ranks=[16, 8, 4]", "seed=3"])
    assert from_run_config(to_run_config(exp)) == exp
    assert all(
        isinstance(v, (bool, int, float, str)) for v in to_run_config(exp).values()
    )


def test_resolved_toml_reloads_to_the_same_experiment(tmp_path: Path) -> None:
    exp = load_experiment(None, ["rounds=2", "peft.ranks=[2, 1]"])
    path = write(tmp_path, to_toml(exp))
    assert load_experiment(path) == exp


def test_pyproject_flower_config_matches_quickstart() -> None:
    """`flwr run .` from a checkout runs the packaged quickstart."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedsim.engine.server_app:app",
        "clientapp": "fedsim.engine.client_app:app",
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


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--set", "rounds=0"],
        ["run", "--set", "strategy.name=nope"],
        ["run", "missing.toml"],
        ["run", "--set", "model.name=cnn", "--set", "data.dataset=synthetic"],
        ["run", "--set", "resources.num-cpus=512"],
        ["run", "--set", "resources.num-gpus=999"],
    ],
)
def test_cli_bad_input_exits_2_without_traceback_or_files(
    args: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()
