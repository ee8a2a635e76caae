"""The one place that picks the torch device of a process."""

from __future__ import annotations

import torch

from fedsim.core.experiment import ResourcesConfig


def resolve_device(cfg: ResourcesConfig) -> torch.device:
    """``cuda`` when asked for (or ``auto`` with GPUs requested) and present."""
    if cfg.device == "cuda" or (cfg.device == "auto" and cfg.num_gpus > 0):
        if not torch.cuda.is_available():
            if cfg.device == "cuda":
                raise RuntimeError("resources.device = 'cuda' but CUDA is unavailable")
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device("cpu")
