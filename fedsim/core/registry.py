"""Registered strategy families, datasets, models, partitioners and privacy
mechanisms.

Entries name their implementation as ``"module:attribute"`` strings and are imported
on first use, so that validating a config or running ``fedsim list`` never imports
torch, Ray or Flower. Strategy families come from the entry-point group
``fedsim.strategies`` (see :mod:`fedsim.core.family`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any

from fedsim.core.family import Family, load

#: Entry-point group of strategy families (built-in ones included).
FAMILY_GROUP = "fedsim.strategies"


@dataclass(frozen=True)
class Entry:
    """One registered component.

    Parameters
    ----------
    target : str
        ``"module:attribute"`` of the implementation.
    summary : str
        One line shown by ``fedsim list``.
    """

    target: str
    summary: str

    def load(self) -> Any:
        """Import and return the implementation."""
        return load(self.target)


class FamilyError(RuntimeError):
    """An installed family declaration is broken (not a user input error)."""


@cache
def families() -> dict[str, Family]:
    """Every strategy family, by name, from the ``fedsim.strategies`` entry points.

    Raises
    ------
    FamilyError
        An entry point that does not load a Family of its own name, or two
        packages declaring the same name.
    """
    found: dict[str, Family] = {}
    origin: dict[str, str] = {}
    for ep in sorted(metadata.entry_points(group=FAMILY_GROUP), key=lambda e: e.name):
        loaded = ep.load()
        declared = [loaded] if isinstance(loaded, Family) else list(_iterable(loaded))
        mine = [f for f in declared if isinstance(f, Family) and f.name == ep.name]
        if len(mine) != 1:
            raise FamilyError(
                f"entry point {ep.name!r} = {ep.value!r} in group {FAMILY_GROUP!r} "
                f"must load a fedsim Family named {ep.name!r}"
            )
        if ep.name in found and origin[ep.name] != ep.value:
            raise FamilyError(
                f"strategy family {ep.name!r} is declared twice: {origin[ep.name]!r} "
                f"and {ep.value!r}"
            )
        found[ep.name], origin[ep.name] = mine[0], ep.value
    return found


def _iterable(obj: Any) -> Iterable[Any]:
    return obj if isinstance(obj, (list, tuple)) else ()


def family(name: str) -> Family:
    """The family registered as ``name`` (KeyError if none)."""
    return families()[name]


DATASETS: Mapping[str, Entry] = {
    "digits": Entry(
        "fedsim.learn.data:load_digits",
        "scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes)",
    ),
    "synthetic": Entry(
        "fedsim.learn.data:load_synthetic",
        "Gaussian classification data; data.size, data.classes, data.features",
    ),
    "file": Entry(
        "fedsim.learn.data:load_file",
        "a local CSV or Parquet file at data.path; label in data.label-column",
    ),
    "hf:<name>": Entry(
        "fedsim.learn.hf_source:load_hf",
        "a Hugging Face dataset by name or local path (datasets.load_dataset)",
    ),
}

MODELS: Mapping[str, Entry] = {
    "mlp": Entry(
        "fedsim.learn.models:build_mlp", "two-layer perceptron (any input shape)"
    ),
    "cnn": Entry(
        "fedsim.learn.models:build_cnn", "small convolutional network for image data"
    ),
    "vit": Entry(
        "fedsim.learn.models:build_vit",
        "ViT-style encoder with named q_proj/k_proj/v_proj/out_proj attention",
    ),
    "tiny-bert": Entry(
        "fedsim.learn.models:build_tiny_bert",
        "transformers BERT from a config (random init, no download) over inputs "
        "quantized into tokens",
    ),
    "hf": Entry(
        "fedsim.learn.hf:build_hf",
        "a Hugging Face model folder or hub id (model.path) for model.task",
    ),
}

#: Entry-point group of model factories from other packages.
MODEL_GROUP = "fedsim.models"


@cache
def models() -> dict[str, Entry]:
    """Built-in models and those of the ``fedsim.models`` entry points; a
    factory is called as ``factory(cfg: ModelConfig, info: DatasetInfo)``."""
    found = dict(MODELS)
    for ep in sorted(metadata.entry_points(group=MODEL_GROUP), key=lambda e: e.name):
        if ep.name in found and found[ep.name].target != ep.value:
            raise FamilyError(
                f"model {ep.name!r} is declared twice: {found[ep.name].target!r} "
                f"and {ep.value!r}"
            )
        found[ep.name] = Entry(ep.value, f"from {ep.dist.name if ep.dist else '?'}")
    return found


def model_name_problem(name: str) -> str | None:
    """What is wrong with a ``model.name`` (None: registered, or a
    ``"package.module:factory"`` to import when the model is built)."""
    if name in models():
        return None
    module, _, attr = name.partition(":")
    if module and attr.isidentifier() and all(
        p.isidentifier() for p in module.split(".")
    ):
        return None
    return (
        f"is not registered; choose one of: {', '.join(sorted(models()))}, or "
        "'package.module:factory'"
    )


def model_entry(name: str) -> Entry:
    """The entry of a model name: registered, or ``"package.module:factory"``."""
    table = models()
    if name in table:
        return table[name]
    return Entry(name, "a factory in the user's own code")

#: The loader of text rows (any dataset source with data.format or
#: data.text-column set): instruction, plain-text and text-classification data.
TEXT_ROWS = Entry(
    "fedsim.learn.text:load_text",
    "text rows of a JSON/JSONL/Parquet/CSV file or a hf: dataset",
)

PRIVACY: Mapping[str, Entry] = {
    "none": Entry("fedsim.privacy.base:NoPrivacy", "no differential privacy"),
    "dp-sgd": Entry(
        "fedsim.privacy.dp_sgd:DpSgd",
        "sample-level DP: Opacus DP-SGD in every client, epsilon per client",
    ),
    "dp-fedavg": Entry(
        "fedsim.privacy.dp_fedavg:DpFedAvg",
        "client-level DP: server-side clipping and noise (fixed or adaptive)",
    ),
}

PARTITIONERS: Mapping[str, Entry] = {
    "iid": Entry("flwr_datasets.partitioner:IidPartitioner", "uniform random split"),
    "dirichlet": Entry(
        "flwr_datasets.partitioner:DirichletPartitioner",
        "label skew from Dir(alpha) per class (data.alpha)",
    ),
    "pathological": Entry(
        "flwr_datasets.partitioner:PathologicalPartitioner",
        "each client holds data.classes-per-client classes",
    ),
    "natural-id": Entry(
        "flwr_datasets.partitioner:NaturalIdPartitioner",
        "one client per value of data.partition-by (a writer, a speaker), or "
        "several values per client (seeded, balanced) when there are fewer clients",
    ),
    # Any other row partitioner of flwr-datasets, with data.partitioner-args.
    "shard": Entry(
        "flwr_datasets.partitioner:ShardPartitioner",
        "label-sorted shards per client (FedAvg paper; data.partitioner-args)",
    ),
    "inner-dirichlet": Entry(
        "flwr_datasets.partitioner:InnerDirichletPartitioner",
        "given client sizes, Dir(alpha) label mix within each (partitioner-args)",
    ),
    "size": Entry(
        "flwr_datasets.partitioner:SizePartitioner",
        "given number of rows per client (data.partitioner-args.partition_sizes)",
    ),
    "linear": Entry(
        "flwr_datasets.partitioner:LinearPartitioner",
        "client sizes proportional to the partition id + 1",
    ),
    "square": Entry(
        "flwr_datasets.partitioner:SquarePartitioner",
        "client sizes proportional to the square of the partition id + 1",
    ),
    "exponential": Entry(
        "flwr_datasets.partitioner:ExponentialPartitioner",
        "client sizes proportional to exp(partition id + 1)",
    ),
    "continuous": Entry(
        "flwr_datasets.partitioner:ContinuousPartitioner",
        "clients ordered along data.partition-by, a numeric column (strictness)",
    ),
    "distribution": Entry(
        "flwr_datasets.partitioner:DistributionPartitioner",
        "label counts per client from a given distribution array",
    ),
    "grouped-natural-id": Entry(
        "flwr_datasets.partitioner:GroupedNaturalIdPartitioner",
        "groups of data.partition-by values (group_size) per client",
    ),
}

#: The partitioners set by keys of their own; the others take
#: ``data.partitioner-args``.
OWN_KEYS_PARTITIONERS = ("iid", "dirichlet", "pathological", "natural-id")


def dataset_entry(name: str) -> Entry:
    """Return the registry entry of a dataset name (``hf:`` names share one)."""
    if name.startswith("hf:"):
        return DATASETS["hf:<name>"]
    return DATASETS[name]
