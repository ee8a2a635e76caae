"""The base model every process builds: the same weights in the server and in
every client process, without any of them sending it."""

from __future__ import annotations

from torch import nn

from fedsim.core.experiment import ModelConfig
from fedsim.learn.data import DatasetInfo
from fedsim.learn.models import build_architecture
from fedsim.learn.pretrain import pretrained_state


def build_model(cfg: ModelConfig, info: DatasetInfo, seed: int) -> nn.Module:
    """Build the configured model with a seeded initialisation.

    With ``model.pretrain`` set, the weights are those of the base pre-trained
    centrally on the public split (:mod:`fedsim.learn.pretrain`, built once and
    cached on disk), so the server and every client process start from the same
    base.
    """
    model = build_architecture(cfg, info, seed)
    if cfg.pretrain:
        model.load_state_dict(pretrained_state(cfg, info, seed))
    return model
