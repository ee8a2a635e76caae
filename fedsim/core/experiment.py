"""The experiment's sections: one frozen dataclass per TOML table.

Every key is declared next to its field (:func:`fedsim.core.schema.option`):
default, one-line help, check. The validator, the key reference of the docs and Flower's
flat run-config all come from these declarations. ``[strategy]`` holds the
family's name and the family's own option table (see :mod:`fedsim.core.family`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsim.core import registry
from fedsim.core.audit_config import AuditConfig
from fedsim.core.family import NoOptions
from fedsim.core.model_config import ModelConfig
from fedsim.core.schema import (
    Check,
    Table,
    at_least,
    fills,
    fraction,
    non_negative,
    one_of,
    open_unit,
    option,
    positive,
    rate,
    unit_interval,
)


def _registered(table: Mapping[str, registry.Entry]) -> Check:
    def check(v: str) -> str | None:
        if v in table:
            return None
        return f"is not registered; choose one of: {', '.join(sorted(table))}"

    return check


def _host_port(v: str) -> str | None:
    """Empty, or ``HOST:PORT`` with a port in 1..65535 (a Ray cluster's GCS)."""
    if v == "":
        return None
    host, _, port = v.rpartition(":")
    if host and port.isdigit() and 0 < int(port) < 65536 and "/" not in v:
        return None
    return "is not HOST:PORT (e.g. 10.0.0.5:6379); leave it empty for a local Ray"


def _family_name(v: str) -> str | None:
    names = registry.families()
    if v in names:
        return None
    return f"is not registered; choose one of: {', '.join(sorted(names))}"


def _dataset_name(v: str) -> str | None:
    if v.startswith("hf:") and len(v) > 3:
        return None
    return _registered(registry.DATASETS)(v)


def _run_name(v: str) -> str | None:
    """A run name becomes a folder name inside ``--out``: one path component."""
    if not v.strip():
        return "must not be empty"
    if any(sep in v for sep in ("/", "\\", "\0")) or v in (".", ".."):
        return "must be a plain folder name (no '/', '\\', '.' or '..')"
    return None


def _all_positive(v: tuple[int, ...]) -> str | None:
    return None if all(x >= 1 for x in v) else "every rank must be >= 1"


@dataclass(frozen=True)
class FederationConfig:
    """``[federation]``: who takes part in each round."""

    clients: int = option(10, "number of virtual clients", at_least(1))
    fraction_train: float = option(
        1.0, "fraction of clients sampled to train each round", fraction
    )
    fraction_evaluate: float = option(
        1.0,
        "fraction of clients sampled for federated evaluation; 0 disables it",
        unit_interval,
    )
    min_replies: int = option(
        1,
        "fewest successful replies a round needs; fewer ends the run as failed",
        at_least(1),
    )
    round_timeout: float = option(
        600.0, "seconds to wait for the replies of one round", positive
    )
    failure_rate: float = option(
        0.0,
        "probability that a sampled client fails in a round (dropout simulation)",
        rate,
    )


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: dataset, partitioning and splits."""

    dataset: str = option("digits", "registered dataset name or hf:NAME", _dataset_name)
    partitioner: str = option(
        "dirichlet",
        "how training data is split among clients",
        _registered(registry.PARTITIONERS),
    )
    alpha: float = option(0.5, "Dirichlet concentration (dirichlet)", positive)
    classes_per_client: int = option(
        2, "classes held by each client (pathological)", at_least(1)
    )
    min_partition_size: int = option(
        10, "smallest client partition the Dirichlet sampler accepts", at_least(0)
    )
    test_fraction: float = option(
        0.2, "held-out global test set for server-side evaluation", open_unit
    )
    client_test_fraction: float = option(
        0.2, "share of each client's partition kept for its local test", open_unit
    )
    path: str = option("", "file path (dataset = 'file') or data files (hf:)")
    label_column: str = option("label", "name of the label column")
    split: str = option("train", "split to load from a Hugging Face dataset")
    size: int = option(2000, "examples of the synthetic dataset", at_least(10))
    classes: int = option(10, "classes of the synthetic dataset", at_least(2))
    features: int = option(20, "features of the synthetic dataset", at_least(2))
    text_column: str = option("", "column of the text (classification, 'text')")
    format: str = option(
        "",
        "'' numeric/image rows; 'text' plain text for a causal LM (text-column); "
        "'alpaca' / 'dolly' instruction rows (instruction, input/context, "
        "output/response)",
        one_of("", "text", "alpaca", "dolly"),
    )
    template: str = option(
        "",
        "prompt of instruction rows: {instruction}, {input}; '' Alpaca's",
        fills("instruction", "input"),
    )
    max_length: int = option(256, "tokens per text row (truncated)", at_least(2))
    subset: str = option("", "config (subset) name of a Hugging Face dataset")
    test_split: str = option(
        "",
        "split of a Hugging Face dataset that is the global test set ('' carves "
        "data.test-fraction out of data.split)",
    )
    partition_by: str = option(
        "",
        "column whose values partition the rows (natural-id: a writer or speaker "
        "id; never a feature); '' is the label column",
    )
    partitioner_args: Table = option(
        Table(),
        "keyword arguments of the flwr-datasets partitioner (a table; not for "
        "iid, dirichlet, pathological, natural-id)",
    )


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: the clients' local training loop."""

    epochs: int = option(1, "local epochs per round", at_least(1))
    batch_size: int = option(32, "local batch size", at_least(1))
    lr: float = option(0.05, "learning rate", positive)
    optimizer: str = option("sgd", "local optimizer", one_of("sgd", "adam"))
    momentum: float = option(0.9, "SGD momentum", rate)
    weight_decay: float = option(0.0, "L2 weight decay", non_negative)
    allow_nonfinite: bool = option(
        False,
        "record a NaN/inf client loss and go on; false: the run fails naming the "
        "round and client",
    )


@dataclass(frozen=True)
class PeftConfig:
    """``[peft]``: parameter-efficient fine-tuning of the client model.

    With ``method = "lora"`` each client trains LoRA adapters on the linear layers
    named in ``targets`` of its frozen base, and the modules in
    ``modules-to-save`` in full. The client with partition id ``i`` uses rank
    ``ranks[i % len(ranks)]`` when ``ranks`` is set, else ``rank``; its
    ``lora_alpha`` is ``alpha-per-rank * r`` when ``alpha-per-rank`` is set (the
    FLoRA reference's heterogeneous setting uses 2 r), else ``alpha``, and its
    scaling is ``lora_alpha / r``. Names match as in PEFT: a module matches a
    name when it is that name or ends in ``.<name>``.
    """

    method: str = option(
        "none",
        "'none' trains the full model; 'lora' trains LoRA adapters",
        one_of("none", "lora"),
    )
    rank: int = option(8, "LoRA rank r of every client", at_least(1))
    ranks: tuple[int, ...] = option(
        [],
        "per-client LoRA ranks: partition i gets ranks[i % len(ranks)]; overrides rank",
        _all_positive,
    )
    alpha: float = option(16.0, "LoRA lora_alpha (scaling = alpha / r)", positive)
    alpha_per_rank: float = option(
        0.0,
        "if > 0, each client's lora_alpha is alpha-per-rank * r (scaling = "
        "alpha-per-rank for every rank) instead of alpha; 0: off",
        non_negative,
    )
    dropout: float = option(0.0, "LoRA dropout on the adapters' input", rate)
    targets: tuple[str, ...] = option(
        ["q_proj", "k_proj", "v_proj", "out_proj"],
        "names of the linear layers LoRA adapts",
    )
    modules_to_save: tuple[str, ...] = option(
        ["head"], "modules trained in full next to the adapters (e.g. the head)"
    )


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: the family and its own options.

    ``options`` is an instance of the family's option table (its keys are
    ``strategy.<key>``), built by :func:`fedsim.core.loading.from_flat`.
    """

    name: str = option("fedavg", "registered strategy family", _family_name)
    options: Any = field(default_factory=NoOptions)


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: differential privacy mechanism.

    ``dp-sgd`` (per example, in every client) and ``dp-fedavg`` (per client, on
    the server) take a fixed ``noise-multiplier``, or a ``target-epsilon`` for
    which the noise is calibrated over all ``rounds``. With both, the noise is
    fixed and ``target-epsilon`` is a budget that is enforced. ``dp-fedavg``
    samples clients as ``client-sampling`` says (see
    :func:`expected_clients_per_round`).
    """

    mechanism: str = option(
        "none", "registered privacy mechanism", _registered(registry.PRIVACY)
    )
    noise_multiplier: float = option(
        0.0,
        "Gaussian noise std / clipping bound; 0 = calibrate from target-epsilon",
        non_negative,
    )
    max_grad_norm: float = option(
        1.0, "dp-sgd: bound on each example's gradient norm", positive
    )
    target_epsilon: float = option(
        0.0, "privacy budget (epsilon at target-delta); 0 = no budget", non_negative
    )
    target_delta: float = option(1e-5, "delta of every reported epsilon", open_unit)
    accountant: str = option(
        "rdp", "privacy accountant (Opacus): rdp or prv", one_of("rdp", "prv")
    )
    client_sampling: str = option(
        "fixed",
        "dp-fedavg: 'fixed' samples clients x fraction-train (accounted as Poisson, "
        "an approximation); 'poisson': each joins with probability fraction-train",
        one_of("fixed", "poisson"),
    )
    clipping: str = option(
        "fixed",
        "dp-fedavg: server-side clipping of client updates",
        one_of("fixed", "adaptive"),
    )
    clipping_norm: float = option(
        1.0,
        "dp-fedavg: bound on a client update's norm (initial if adaptive)",
        positive,
    )
    target_unclipped_quantile: float = option(
        0.5,
        "dp-fedavg adaptive: share of updates the clipping norm leaves unclipped",
        unit_interval,
    )
    clip_norm_lr: float = option(
        0.2, "dp-fedavg adaptive: learning rate of the clipping norm", positive
    )
    clipped_count_stddev: float = option(
        0.0,
        "dp-fedavg adaptive: noise std of the unclipped count; 0 = clients/round / 20",
        non_negative,
    )
    count_release: str = option(
        "centred",
        "dp-fedavg adaptive: 'centred' counts b - 1/2 per client (sensitivity 1/2, "
        "Andrew et al. / TF-Privacy); 'uncentred' counts b (sensitivity 1)",
        one_of("centred", "uncentred"),
    )


@dataclass(frozen=True)
class ResourcesConfig:
    """``[resources]``: what each virtual client gets from Ray."""

    num_cpus: int = option(1, "CPU cores per virtual client", at_least(1))
    num_gpus: float = option(
        0.0, "GPUs per virtual client (fractions share a GPU)", non_negative
    )
    device: str = option(
        "auto",
        "torch device: auto picks cuda when GPUs are requested",
        one_of("auto", "cpu", "cuda"),
    )
    ray_address: str = option(
        "",
        "HOST:PORT of an existing Ray cluster to run the clients on (fedsim "
        "installed on every node); empty: a private Ray on loopback, whatever "
        "RAY_ADDRESS says",
        _host_port,
    )


@dataclass(frozen=True)
class RobustConfig:
    """``[robust]``: PGD robustness evaluation (L-infinity, Madry et al. 2018),
    reported next to clean accuracy by every client evaluation that supports it
    and by the server's evaluation of a global model."""

    epsilon: float = option(
        0.0,
        "L-inf radius of the PGD attack; 0 turns robust evaluation off",
        non_negative,
    )
    steps: int = option(10, "PGD steps", at_least(1))
    step_size: float = option(
        0.0, "PGD step size; 0: 2.5 * epsilon / steps (Madry et al.)", non_negative
    )
    clip: bool = option(True, "keep adversarial inputs in [0, 1] (image data)")


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

    tensorboard: bool = option(
        False,
        "write TensorBoard event files to <run dir>/tensorboard",
        _installed("tensorboard", "tensorboard"),
    )
    mlflow: bool = option(
        False, "log params and round metrics to MLflow", _installed("mlflow", "mlflow")
    )
    mlflow_uri: str = option(
        "",
        "MLflow tracking URI; empty: sqlite:///<runs folder>/mlflow.db",
    )
    mlflow_experiment: str = option("", "MLflow experiment; empty: the experiment name")


def _seed(v: int) -> str | None:
    # numpy's and scikit-learn's generators take 32-bit unsigned seeds
    return None if 0 <= v < 2**32 else f"must be in [0, {2**32 - 1}]"


@dataclass(frozen=True)
class Experiment:
    """A whole experiment, as read from its TOML file."""

    name: str = option(
        "quickstart", "run name; the run directory starts with it", _run_name
    )
    seed: int = option(
        0,
        "seed of partitioning, sampling, initialisation, training",
        _seed,
    )
    rounds: int = option(20, "federated rounds", at_least(1))
    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


def expected_clients_per_round(experiment: Experiment) -> float:
    """Clients a ``dp-fedavg`` round is calibrated for (its fixed denominator).

    ``privacy.client-sampling = "fixed"``: the ``max(int(clients x
    fraction-train), 1)`` clients Flower's FedAvg samples; ``"poisson"``: their
    expected number ``clients x fraction-train`` (each client joins with
    probability ``fraction-train``).
    """
    fed = experiment.federation
    if experiment.privacy.client_sampling == "poisson":
        return fed.clients * fed.fraction_train
    return float(max(int(fed.clients * fed.fraction_train), 1))
