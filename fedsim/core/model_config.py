"""``[model]``: the network the clients train (:class:`ModelConfig`), a section
of :class:`fedsim.core.experiment.Experiment`."""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.core import registry
from fedsim.core.schema import at_least, one_of, option, rate

__all__ = ["ModelConfig"]

#: ``model.dtype`` values of Hugging Face weights.
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the network trained by the clients."""

    name: str = option(
        "cnn",
        "registered model name, 'hf' (a Hugging Face folder or hub id in "
        "model.path) or 'package.module:factory'",
        registry.model_name_problem,
    )
    path: str = option("", "Hugging Face model folder or hub id (name = 'hf')")
    task: str = option(
        "sequence-classification",
        "what an 'hf' model is trained for (its AutoModelFor... class)",
        one_of("causal-lm", "sequence-classification", "image-classification"),
    )
    dtype: str = option("float32", "'hf' weights", one_of(*_DTYPES))
    gradient_checkpointing: bool = option(False, "'hf': recompute activations")
    hidden: int = option(64, "width of hidden layers / embedding size", at_least(1))
    depth: int = option(2, "encoder blocks (vit)", at_least(1))
    heads: int = option(4, "attention heads (vit); must divide hidden", at_least(1))
    patch_size: int = option(2, "side of square image patches (vit)", at_least(1))
    dropout: float = option(0.0, "dropout probability", rate)
    pretrain: str = option(
        "",
        "'' starts from the seeded random init; 'digits' or 'synthetic' first "
        "pre-trains the base centrally on that data set's public split (cached)",
        one_of("", "digits", "synthetic"),
    )
    pretrain_classes: tuple[int, ...] = option(
        [],
        "classes that make up the public split (empty: all)",
        lambda v: None if all(c >= 0 for c in v) else "every class must be >= 0",
    )
    pretrain_epochs: int = option(20, "epochs of central pre-training", at_least(1))
