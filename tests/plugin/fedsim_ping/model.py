"""A user's own model, registered in the ``fedsim.models`` entry-point group
(``ping-linear``) and also reachable as ``fedsim_ping.model:build``."""

import math

from torch import nn


class UserLinear(nn.Module):
    """A linear classifier; its parameters carry the user's own names."""

    def __init__(self, features: int, classes: int, scale: float):
        super().__init__()
        self.user_linear = nn.Linear(features, classes)
        self.scale = scale

    def forward(self, x):
        return self.user_linear(x.flatten(1)) * self.scale


def build(cfg, info):
    """The factory: the model options (``cfg``) and the data's input shape and
    classes (``info``)."""
    return UserLinear(math.prod(info.input_shape), info.num_classes, cfg.hidden / 64)
