"""Hugging Face models: ``model.name = "hf"``.

``model.path`` is a local folder (loaded with ``local_files_only``) or a hub id
(loaded through the hub, where there is internet). ``model.task`` picks the
``AutoModelFor...`` class; a classification head gets ``num_labels`` from the
data (a head the checkpoint lacks is initialised from the run's seed, the same
in every process). The tokenizer (text) or image processor (images) comes from
the same folder.

The loaded model sits inside :class:`HFModel`, an ``nn.Module`` whose
``forward(x)`` returns logits, so the training loop, LoRA, DP-SGD and the
families call it as any built-in model: ``x`` is a tokenised batch
``(b, 2, L)`` (:mod:`fedsim.learn.text`, cut to its longest row here: dynamic
padding) or an image batch ``(b, c, h, w)`` in [0, 1] (through the image
processor saved with the model: :meth:`HFModel.pixels`). Its parameters
are named ``hf.<the model's own names>``.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import ModelConfig
from fedsim.learn.data import DatasetInfo
from fedsim.learn.text import PAD, pad_id, trim

#: ``model.task`` -> the transformers auto class that loads it.
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}


#: ``model.dtype`` -> the dtype its floating arrays travel in. Flower's arrays
#: are numpy arrays and numpy has no bfloat16: a bfloat16 model's arrays travel
#: as float32 (exact: every bfloat16 is a float32, and loading them back into
#: the bfloat16 model restores the same values), a float16 model's as float16.
WIRE_DTYPES = {"float32": "float32", "bfloat16": "float32", "float16": "float16"}


def wire_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype a model's floating arrays travel in (:data:`WIRE_DTYPES`;
    float32 for every model but ``hf``)."""
    name = WIRE_DTYPES[cfg.dtype] if cfg.name == "hf" else "float32"
    return getattr(torch, name)  # type: ignore[no-any-return]


def to_wire(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``tensors`` with every floating one cast to ``dtype`` (CPU)."""
    return {
        k: v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()
        for k, v in tensors.items()
    }


def _bfloat16_as_float32(
    module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any
) -> None:
    """State-dict hook: bfloat16 entries as float32 (see :data:`WIRE_DTYPES`)."""
    for key, value in state.items():
        if key.startswith(prefix) and value.dtype == torch.bfloat16:
            state[key] = value.float()


def _source(cfg: ModelConfig) -> tuple[str, bool]:
    """The path or hub id, and whether it is a local folder."""
    if not cfg.path:
        raise ConfigError("model.path: a folder or hub id is required for 'hf'")
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists() or cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") > 1:
        raise ConfigError(f"model.path: {cfg.path!r} is not a model folder")
    return cfg.path, False


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:240]


@lru_cache(maxsize=2)
def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer saved beside the model (``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    source, local = _source(cfg)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(
            f"model.path: no tokenizer in {cfg.path!r}: {_first_line(err)}"
        ) from None


def load_processor(cfg: ModelConfig) -> Any:
    """The image processor saved beside the model, or None."""
    from transformers import AutoImageProcessor

    source, local = _source(cfg)
    try:
        return AutoImageProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, TypeError):
        return None


def load_pretrained(cfg: ModelConfig, num_labels: int) -> Any:
    """``AutoModelFor<task>.from_pretrained(model.path)`` in ``model.dtype``."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one line per error
    source, local = _source(cfg)
    auto = getattr(transformers, AUTO_CLASSES[cfg.task])
    kwargs: dict[str, Any] = {
        "local_files_only": local,
        "dtype": getattr(torch, cfg.dtype),
    }
    if cfg.task != "causal-lm":
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    try:
        return auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"model.path: cannot load {cfg.path!r} as {cfg.task} "
            f"({AUTO_CLASSES[cfg.task]}): {_first_line(err)}"
        ) from None


class HFModel(nn.Module):
    """A ``transformers`` model whose ``forward(x)`` returns its logits.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The loaded model (kept as ``self.hf``).
    task : str
        ``model.task``.
    processor : object or None
        The tokenizer (text tasks) or image processor; saved with the export.
    """

    def __init__(self, model: Any, task: str, processor: Any = None):
        super().__init__()
        self.hf = model
        self.task = task
        self.processor: Any = processor
        if model.dtype == torch.bfloat16:
            self.register_state_dict_post_hook(_bfloat16_as_float32)
        self.image_size = self.channels = 0
        mean = std = None
        if task == "image-classification":
            size = getattr(model.config, "image_size", 0)
            self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
            self.channels = int(getattr(model.config, "num_channels", 3))
            mean = getattr(processor, "image_mean", None)
            std = getattr(processor, "image_std", None)
        self.register_buffer(
            "mean", torch.tensor(mean if mean else [0.0]), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std if std else [1.0]), persistent=False
        )

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the model's ``pixel_values``: the image
        processor's own call (its resize, resample and normalisation; the data
        are rescaled already, so ``do_rescale=False``), grey images repeated
        over the model's channels. Without a processor, or for inputs that
        need gradients (the privacy audit's inversions), the differentiable
        equivalent in torch: bilinear resize to the model's image size,
        normalised with the processor's mean and std (the processor rounds to
        8 bits when it resizes; this path does not)."""
        if x.shape[1] != self.channels:
            x = x.mean(dim=1, keepdim=True).expand(-1, self.channels, -1, -1)
        if self.processor is not None and not x.requires_grad:
            out = self.processor(
                images=list(x.detach().float().cpu().numpy()),
                do_rescale=False,
                input_data_format="channels_first",
                data_format="channels_first",
                return_tensors="pt",
            )["pixel_values"]
            return out.to(device=x.device, dtype=self.hf.dtype)  # type: ignore[no-any-return]
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear"
            )
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x.to(self.hf.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "image-classification":
            return self.hf(pixel_values=self.pixels(x)).logits  # type: ignore[no-any-return]
        x = trim(x)
        mask = (x[:, 1] != PAD).long()
        out = self.hf(input_ids=x[:, 0], attention_mask=mask, use_cache=False)
        return out.logits  # type: ignore[no-any-return]


def build_hf(cfg: ModelConfig, info: DatasetInfo) -> nn.Module:
    """The ``hf`` model: ``model.path`` loaded for ``model.task``."""
    image = cfg.task == "image-classification"
    processor = load_processor(cfg) if image else load_tokenizer(cfg)
    model = load_pretrained(cfg, info.num_classes)
    if not image and model.config.pad_token_id is None:
        # sequence classification finds each row's last token by the pad id
        model.config.pad_token_id = pad_id(processor)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return HFModel(model, cfg.task, processor)


def merged(model: HFModel) -> HFModel:
    """``model``, or where PEFT layers were injected into it in place (split
    learning's LoRA) a copy with each merged into its base layer (PEFT's own
    ``merge``) and replaced by it."""
    import sys

    if "peft" not in sys.modules:  # no PEFT layer without PEFT imported
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:  # PEFT's own merge, then the base layer in its place
        layer: Any = model.get_submodule(name)
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    return model


def export(model: nn.Module, folder: Path) -> None:
    """Save the final model under ``folder``: an :class:`HFModel` (LoRA merged
    into its weights, :func:`merged`) with ``save_pretrained`` and its tokenizer or
    processor, reloadable with the task's ``AutoModelFor...``; any other model's
    state dict as ``model.safetensors``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, HFModel):
        hf: Any = merged(model).hf
        hf.save_pretrained(folder)
        if model.processor is not None:
            model.processor.save_pretrained(folder)
        return
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
