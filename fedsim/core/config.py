"""Experiment configuration: a TOML file becomes frozen, validated config objects.

The experiment file has nested tables with kebab-case keys (``[federation]``,
``[data]``, ...). Every key maps to a field of one of the frozen dataclasses below;
its type, default, allowed values and help text live next to the field, so the
validator, the README reference and Flower's flat run-config all come from one
place. Errors are :class:`ConfigError` with a one-line message that names the
dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from fedsim.core import registry

RunConfig = dict[str, bool | int | float | str]

#: Run-config key (outside the experiment schema) carrying the run directory.
RUN_DIR_KEY = "run-dir"


class ConfigError(ValueError):
    """An invalid experiment; the message is one line naming the key."""


Check = Callable[[Any], str | None]


def _opt(default: Any, help: str, check: Check | None = None) -> Any:
    """Declare one experiment key: default, one-line help and a value check."""
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"help": help, "check": check})


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _open_unit(v: float) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


def _rate(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _one_of(*names: str) -> Check:
    return lambda v: (
        None if v in names else f"is not allowed; choose one of: {', '.join(names)}"
    )


def _registered(table: Mapping[str, registry.Entry]) -> Check:
    def check(v: str) -> str | None:
        if v in table:
            return None
        return f"is not registered; choose one of: {', '.join(sorted(table))}"

    return check


def _dataset_name(v: str) -> str | None:
    if v.startswith("hf:") and len(v) > 3:
        return None
    return _registered(registry.DATASETS)(v)


def _all_positive(v: tuple[int, ...]) -> str | None:
    return None if all(x >= 1 for x in v) else "every rank must be >= 1"


@dataclass(frozen=True)
class FederationConfig:
    """``[federation]``: who takes part in each round."""

    clients: int = _opt(10, "number of virtual clients", _at_least(1))
    fraction_train: float = _opt(
        1.0, "fraction of clients sampled to train each round", _fraction
    )
    fraction_evaluate: float = _opt(
        1.0, "fraction of clients sampled for federated evaluation", _fraction
    )
    min_replies: int = _opt(
        1,
        "fewest successful replies a round needs; fewer ends the run as failed",
        _at_least(1),
    )
    round_timeout: float = _opt(
        600.0, "seconds to wait for the replies of one round", _positive
    )
    failure_rate: float = _opt(
        0.0,
        "probability that a sampled client fails in a round (dropout simulation)",
        _rate,
    )


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: dataset, partitioning and splits."""

    dataset: str = _opt("digits", "registered dataset name or hf:NAME", _dataset_name)
    partitioner: str = _opt(
        "dirichlet",
        "how training data is split among clients",
        _registered(registry.PARTITIONERS),
    )
    alpha: float = _opt(0.5, "Dirichlet concentration (dirichlet)", _positive)
    classes_per_client: int = _opt(
        2, "classes held by each client (pathological)", _at_least(1)
    )
    min_partition_size: int = _opt(
        10, "smallest client partition the Dirichlet sampler accepts", _at_least(0)
    )
    test_fraction: float = _opt(
        0.2, "held-out global test set for server-side evaluation", _open_unit
    )
    client_test_fraction: float = _opt(
        0.2, "share of each client's partition kept for its local test", _open_unit
    )
    path: str = _opt("", "file path (dataset = 'file') or data files (hf:)")
    label_column: str = _opt("label", "name of the label column")
    split: str = _opt("train", "split to load from a Hugging Face dataset")
    size: int = _opt(2000, "examples of the synthetic dataset", _at_least(10))
    classes: int = _opt(10, "classes of the synthetic dataset", _at_least(2))
    features: int = _opt(20, "features of the synthetic dataset", _at_least(2))


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the network trained by the clients."""

    name: str = _opt("cnn", "registered model name", _registered(registry.MODELS))
    hidden: int = _opt(64, "width of hidden layers / embedding size", _at_least(1))
    depth: int = _opt(2, "encoder blocks (vit)", _at_least(1))
    heads: int = _opt(4, "attention heads (vit); must divide hidden", _at_least(1))
    patch_size: int = _opt(2, "side of square image patches (vit)", _at_least(1))
    dropout: float = _opt(0.0, "dropout probability", _rate)
    pretrain: str = _opt(
        "",
        "'' starts from the seeded random init; 'digits' or 'synthetic' first "
        "pre-trains the base centrally on that data set's public split (cached)",
        _one_of("", "digits", "synthetic"),
    )
    pretrain_classes: tuple[int, ...] = _opt(
        [],
        "classes that make up the public split (empty: all)",
        lambda v: None if all(c >= 0 for c in v) else "every class must be >= 0",
    )
    pretrain_epochs: int = _opt(20, "epochs of central pre-training", _at_least(1))


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: the clients' local training loop."""

    epochs: int = _opt(1, "local epochs per round", _at_least(1))
    batch_size: int = _opt(32, "local batch size", _at_least(1))
    lr: float = _opt(0.05, "learning rate", _positive)
    optimizer: str = _opt("sgd", "local optimizer", _one_of("sgd", "adam"))
    momentum: float = _opt(0.9, "SGD momentum", _rate)
    weight_decay: float = _opt(0.0, "L2 weight decay", _non_negative)


@dataclass(frozen=True)
class PeftConfig:
    """``[peft]``: parameter-efficient fine-tuning of the client model.

    With ``method = "lora"`` each client trains LoRA adapters on the linear layers
    named in ``targets`` of its frozen base, and the modules in
    ``modules-to-save`` in full. The client with partition id ``i`` uses rank
    ``ranks[i % len(ranks)]`` when ``ranks`` is set, else ``rank``; its scaling is
    ``alpha / r``. Names match as in PEFT: a module matches a name when it is that
    name or ends in ``.<name>``.
    """

    method: str = _opt(
        "none",
        "'none' trains the full model; 'lora' trains LoRA adapters",
        _one_of("none", "lora"),
    )
    rank: int = _opt(8, "LoRA rank r of every client", _at_least(1))
    ranks: tuple[int, ...] = _opt(
        [],
        "per-client LoRA ranks: partition i gets ranks[i % len(ranks)]; overrides rank",
        _all_positive,
    )
    alpha: float = _opt(16.0, "LoRA lora_alpha (scaling = alpha / r)", _positive)
    dropout: float = _opt(0.0, "LoRA dropout on the adapters' input", _rate)
    targets: tuple[str, ...] = _opt(
        ["q_proj", "k_proj", "v_proj", "out_proj"],
        "names of the linear layers LoRA adapts",
    )
    modules_to_save: tuple[str, ...] = _opt(
        ["head"], "modules trained in full next to the adapters (e.g. the head)"
    )


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: the server-side algorithm."""

    name: str = _opt(
        "fedavg", "registered strategy name", _registered(registry.STRATEGIES)
    )


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: differential privacy mechanism.

    ``dp-sgd`` (per example, in every client) and ``dp-fedavg`` (per client, on
    the server) take a fixed ``noise-multiplier``, or a ``target-epsilon`` for
    which the noise is calibrated over all ``rounds``. With both, the noise is
    fixed and ``target-epsilon`` is a budget that is enforced.
    """

    mechanism: str = _opt(
        "none", "registered privacy mechanism", _registered(registry.PRIVACY)
    )
    noise_multiplier: float = _opt(
        0.0,
        "Gaussian noise std / clipping bound; 0 = calibrate from target-epsilon",
        _non_negative,
    )
    max_grad_norm: float = _opt(
        1.0, "dp-sgd: bound on each example's gradient norm", _positive
    )
    target_epsilon: float = _opt(
        0.0, "privacy budget (epsilon at target-delta); 0 = no budget", _non_negative
    )
    target_delta: float = _opt(1e-5, "delta of every reported epsilon", _open_unit)
    accountant: str = _opt(
        "rdp", "privacy accountant (Opacus): rdp or prv", _one_of("rdp", "prv")
    )
    clipping: str = _opt(
        "fixed",
        "dp-fedavg: server-side clipping of client updates",
        _one_of("fixed", "adaptive"),
    )
    clipping_norm: float = _opt(
        1.0,
        "dp-fedavg: bound on a client update's norm (initial if adaptive)",
        _positive,
    )
    target_unclipped_quantile: float = _opt(
        0.5,
        "dp-fedavg adaptive: share of updates the clipping norm leaves unclipped",
        lambda v: None if 0 <= v <= 1 else "must be in [0, 1]",
    )
    clip_norm_lr: float = _opt(
        0.2, "dp-fedavg adaptive: learning rate of the clipping norm", _positive
    )
    clipped_count_stddev: float = _opt(
        0.0,
        "dp-fedavg adaptive: noise std of the clipped count; 0 = sampled clients/20",
        _non_negative,
    )


@dataclass(frozen=True)
class ResourcesConfig:
    """``[resources]``: what each virtual client gets from Ray."""

    num_cpus: int = _opt(1, "CPU cores per virtual client", _at_least(1))
    num_gpus: float = _opt(
        0.0, "GPUs per virtual client (fractions share a GPU)", _non_negative
    )
    device: str = _opt(
        "auto",
        "torch device: auto picks cuda when GPUs are requested",
        _one_of("auto", "cpu", "cuda"),
    )


def _installed(module: str, extra: str) -> Check:
    """Allow ``true`` only where the optional extra providing ``module`` is in."""

    def check(v: bool) -> str | None:
        from importlib.util import find_spec

        if not v or find_spec(module) is not None:
            return None
        return f"needs the optional extra: pip install 'fedsim[{extra}]'"

    return check


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``: round metrics also sent to experiment trackers."""

    tensorboard: bool = _opt(
        False,
        "write TensorBoard event files to <run dir>/tensorboard",
        _installed("tensorboard", "tensorboard"),
    )
    mlflow: bool = _opt(
        False, "log params and round metrics to MLflow", _installed("mlflow", "mlflow")
    )
    mlflow_uri: str = _opt(
        "",
        "MLflow tracking URI; empty: sqlite:///<runs folder>/mlflow.db",
    )
    mlflow_experiment: str = _opt("", "MLflow experiment; empty: the experiment name")


@dataclass(frozen=True)
class Experiment:
    """A whole experiment, as read from its TOML file."""

    name: str = _opt("quickstart", "run name; the run directory starts with it")
    seed: int = _opt(0, "seed of partitioning, sampling, initialisation, training")
    rounds: int = _opt(20, "federated rounds", _at_least(1))
    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def schema() -> dict[str, tuple[type, dataclasses.Field[Any]]]:
    """Every dotted experiment key with its type and field declaration."""
    out: dict[str, tuple[type, dataclasses.Field[Any]]] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = prefix + _kebab(f.name)
            if _is_section(tp):
                walk(tp, key + ".")
            else:
                out[key] = (tp, f)

    walk(Experiment, "")
    return out


_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{key}: expected a list of {_TYPE_WORDS[item_tp][2:]}s, got {value!r}"
            )
        return tuple(_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(
            f"{key}: expected {_TYPE_WORDS[tp]}, got {value!r} ({type(value).__name__})"
        )
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{key}: unknown key{hint}")


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as one dict of dotted keys (``{"data": {"alpha": 1}}`` ->
    ``{"data.alpha": 1}``)."""
    flat: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + _kebab(f.name)
        if _is_section(tp):
            kwargs[f.name] = _build(tp, values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs)


def from_flat(values: Mapping[str, Any]) -> Experiment:
    """Validate flat dotted keys and build the frozen :class:`Experiment`."""
    keys = schema()
    checked: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in keys:
            raise _unknown_key(key, keys)
        tp, f = keys[key]
        value = _coerce(key, tp, raw)
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{key}: {value!r} {problem}")
        checked[key] = value
    exp = typing.cast(Experiment, _build(Experiment, checked, ""))
    _check_consistency(exp)
    return exp


def _check_consistency(exp: Experiment) -> None:
    fed = exp.federation
    if fed.min_replies > fed.clients:
        raise ConfigError(
            f"federation.min-replies: {fed.min_replies} must be <= federation.clients"
            f" ({fed.clients})"
        )
    if exp.data.dataset == "file" and not exp.data.path:
        raise ConfigError("data.path: required when data.dataset = 'file'")
    if exp.model.hidden % exp.model.heads and exp.model.name == "vit":
        raise ConfigError(
            f"model.heads: {exp.model.heads} must divide model.hidden "
            f"({exp.model.hidden})"
        )
    _check_peft(exp)
    _check_privacy(exp)


#: Strategies whose clients train LoRA adapters (``peft.method = "lora"``).
_LORA_STRATEGIES = ("flora", "fedit")
#: Data keys that decide which examples form the global test set.
_SPLIT_KEYS = ("test_fraction", "size", "classes", "features")


def _check_peft(exp: Experiment) -> None:
    peft, name = exp.peft, exp.strategy.name
    if name in _LORA_STRATEGIES and peft.method != "lora":
        raise ConfigError(
            f"peft.method: {peft.method!r} cannot run strategy.name = {name!r}, "
            "which aggregates LoRA adapters; set peft.method = 'lora'"
        )
    if name == "fedavg" and peft.method == "lora":
        raise ConfigError(
            "peft.method: 'lora' needs a LoRA strategy "
            f"({', '.join(_LORA_STRATEGIES)}); strategy.name = 'fedavg' averages "
            "whole models"
        )
    if peft.method == "lora" and not peft.targets:
        raise ConfigError("peft.targets: LoRA needs at least one module name")
    model, data = exp.model, exp.data
    if model.pretrain and model.pretrain == data.dataset:
        # The public split leaves out the global test set drawn with the default
        # data settings and the run's seed; other settings would leak test images
        # into pre-training.
        default = DataConfig()
        for key in _SPLIT_KEYS:
            if getattr(data, key) != getattr(default, key):
                raise ConfigError(
                    f"data.{_kebab(key)}: must keep its default "
                    f"({getattr(default, key)!r}) when model.pretrain = "
                    f"{model.pretrain!r}, whose public split holds out the default "
                    "global test set"
                )


#: Strategies whose replies are whole models averaged as FedAvg does: the only
#: ones whose client updates DP-FedAvg can clip and noise meaningfully.
_DP_FEDAVG_STRATEGIES = ("fedavg",)
_DP_FEDAVG_REJECTED = {
    "flora": "FLoRA stacks the clients' LoRA adapters instead of averaging them, so "
    "a clipped update is not divided among the sampled clients and the noise "
    "would not cover it",
    "fedit": "FedIT exchanges LoRA adapters while the server keeps the whole "
    "model, so the update Flower's wrapper clips is not what the server releases",
}


def _check_privacy(exp: Experiment) -> None:
    p = exp.privacy
    if p.mechanism == "none":
        return
    if p.noise_multiplier == 0 and p.target_epsilon == 0:
        raise ConfigError(
            f"privacy.noise-multiplier: 0 with no privacy.target-epsilon gives "
            f"{p.mechanism!r} no privacy; set noise-multiplier > 0 or "
            "target-epsilon > 0"
        )
    if p.mechanism != "dp-fedavg":
        return
    name = exp.strategy.name
    if name not in _DP_FEDAVG_STRATEGIES:
        reason = _DP_FEDAVG_REJECTED.get(
            name, f"{name!r} does not exchange whole models averaged as FedAvg does"
        )
        raise ConfigError(
            f"strategy.name: {name!r} cannot run under privacy.mechanism = "
            f"'dp-fedavg': {reason}; use strategy.name = 'fedavg', or "
            "privacy.mechanism = 'dp-sgd'"
        )
    sampled = max(int(exp.federation.clients * exp.federation.fraction_train), 1)
    stddev = p.clipped_count_stddev or sampled / 20
    if p.clipping == "adaptive" and p.noise_multiplier >= stddev:
        raise ConfigError(
            f"privacy.noise-multiplier: {p.noise_multiplier:g} must be < "
            f"clipped-count-stddev = {stddev:g} with adaptive clipping "
            f"({sampled} clients per round); raise privacy.clipped-count-stddev"
        )


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE``; VALUE is read as TOML, else taken as a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. rounds=5")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def packaged_quickstart() -> Path:
    """Path of the experiment ``fedsim run`` uses without an argument."""
    return Path(str(resources.files("fedsim") / "quickstart.toml"))


def load_experiment(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> Experiment:
    """Read an experiment file, apply ``KEY=VALUE`` overrides and validate it.

    Parameters
    ----------
    path : str or Path, optional
        Experiment TOML; the packaged quickstart when omitted.
    overrides : sequence of str
        ``KEY=VALUE`` strings with dotted keys (``data.alpha=0.1``).

    Raises
    ------
    ConfigError
        One-line message naming the key and what is allowed.
    """
    file = Path(path) if path is not None else packaged_quickstart()
    if not file.is_file():
        raise ConfigError(f"experiment file not found: {file}")
    try:
        table = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: invalid TOML: {err}") from None
    values = flatten(table)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return from_flat(values)


def to_dict(exp: Experiment) -> dict[str, Any]:
    """Nested dict with kebab-case keys, as in an experiment file."""

    def conv(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {
                _kebab(f.name): conv(getattr(obj, f.name))
                for f in dataclasses.fields(obj)
            }
        if isinstance(obj, tuple):
            return list(obj)
        return obj

    return typing.cast(dict[str, Any], conv(exp))


def to_toml(exp: Experiment) -> str:
    """The fully resolved experiment as TOML text (scalars first, then tables)."""
    return tomli_w.dumps(to_dict(exp))


def to_run_config(exp: Experiment) -> RunConfig:
    """Flatten to Flower's run-config: dotted keys, lists as JSON strings."""
    flat = flatten(to_dict(exp))
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in flat.items()}


def from_run_config(run_config: Mapping[str, Any]) -> Experiment:
    """Rebuild the experiment from Flower's run-config (inverse of to_run_config)."""
    keys = schema()
    values: dict[str, Any] = {}
    for key, value in run_config.items():
        if key == RUN_DIR_KEY:
            continue
        tp = keys[key][0] if key in keys else None
        if tp is not None and typing.get_origin(tp) is tuple and isinstance(value, str):
            value = json.loads(value)
        values[key] = value
    return from_flat(values)


def reference() -> list[tuple[str, str, str]]:
    """(dotted key, default as TOML, help) for every key; feeds the docs."""
    rows = []
    for key, (_, f) in schema().items():
        default = f.default
        if isinstance(default, tuple):
            shown = json.dumps(list(default))
        else:
            shown = tomli_w.dumps({"v": default})[4:].strip()
        rows.append((key, shown, f.metadata["help"]))
    return rows


def reference_markdown() -> str:
    """The experiment-file reference table of the README."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, help_text in reference():
        lines.append(f"| `{key}` | `{default}` | {help_text} |")
    return "\n".join(lines) + "\n"
