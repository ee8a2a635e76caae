"""A client whose loss is NaN or infinite fails the run.

Training that diverges would otherwise end ``completed`` with NaN rows. The
recorder checks every client's reply as it records it: a non-finite ``loss``
raises :class:`fedsim.core.errors.RoundFailed` naming the round, the phase and
the client, so the run ends ``failed`` (exit 1) after the rounds before it were
recorded. ``train.allow-nonfinite = true`` records the value and goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedsim.core.errors import RoundFailed

#: The reply metric checked.
LOSS = "loss"


def check_loss(
    exp: Any, server_round: int, phase: str, client: int, metrics: Mapping[str, Any]
) -> None:
    """Raise RoundFailed when ``metrics`` holds a non-finite loss (unless the
    experiment allows it)."""
    value = metrics.get(LOSS)
    if value is None or exp.train.allow_nonfinite or math.isfinite(float(value)):
        return
    raise RoundFailed(
        f"round {server_round}: client {client}'s {phase} loss is {float(value)} "
        "(training diverged); lower train.lr, or set train.allow-nonfinite = true "
        "to record it and go on"
    )
