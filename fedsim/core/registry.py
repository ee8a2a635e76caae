"""Registered strategies, datasets, models and privacy mechanisms.

Entries name their implementation as ``"module:attribute"`` strings and are imported
on first use, so that validating a config or running ``fedsim list`` never imports
torch, Ray or Flower.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered component.

    Parameters
    ----------
    target : str
        ``"module:attribute"`` of the implementation.
    summary : str
        One line shown by ``fedsim list``.
    client : str
        For strategies: ``"module:attribute"`` of the client algorithm that
        matches the strategy's message contract; empty otherwise.
    """

    target: str
    summary: str
    client: str = ""

    def load(self) -> Any:
        """Import and return the implementation."""
        return _import(self.target)

    def load_client(self) -> Any:
        """Import and return the client algorithm of a strategy."""
        if not self.client:
            raise LookupError(f"{self.target} names no client algorithm")
        return _import(self.client)


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


STRATEGIES: Mapping[str, Entry] = {
    "fedavg": Entry(
        "strategies.fedavg:build",
        "FedAvg (McMahan et al., 2017): example-weighted average of full models",
        client="clients.full:FullModelClient",
    ),
    "flora": Entry(
        "strategies.flora:build",
        "FLoRA (Wang et al., 2024): stacks heterogeneous-rank LoRA adapters, "
        "merges them into the base",
        client="clients.lora:LoraClient",
    ),
    "fedit": Entry(
        "strategies.fedit:build",
        "FedIT (Zhang et al., 2024): averages LoRA A and B separately "
        "(zero-padded ranks)",
        client="clients.lora:LoraClient",
    ),
}

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
        "fedsim.learn.data:load_hf",
        "a Hugging Face dataset by name or local path (datasets.load_dataset)",
    ),
}

MODELS: Mapping[str, Entry] = {
    "mlp": Entry("fedsim.learn.models:build_mlp", "two-layer perceptron (any input shape)"),
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
}

PRIVACY: Mapping[str, Entry] = {
    "none": Entry("fedsim.privacy.mechanisms:NoPrivacy", "no differential privacy"),
    "dp-sgd": Entry(
        "fedsim.privacy.mechanisms:DpSgd",
        "sample-level DP: Opacus DP-SGD in every client, epsilon per client",
    ),
    "dp-fedavg": Entry(
        "fedsim.privacy.mechanisms:DpFedAvg",
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
}


def dataset_entry(name: str) -> Entry:
    """Return the registry entry of a dataset name (``hf:`` names share one)."""
    if name.startswith("hf:"):
        return DATASETS["hf:<name>"]
    return DATASETS[name]
