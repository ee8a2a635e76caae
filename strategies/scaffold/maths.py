"""SCAFFOLD's server maths (Karimireddy et al. 2020, Algorithm 1) as a pure
numpy function over named arrays (see :mod:`fedsim.strategies.scaffold`; the
client's option II update is :func:`fedsim.clients.scaffold.client_control`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def server_update(
    x: Arrays,
    c: Arrays,
    delta_y: Sequence[Arrays],
    delta_c: Sequence[Arrays],
    *,
    num_clients: int,
    server_lr: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``x += eta_g mean_S(dy_i)``, ``c += (1/N) sum_S dc_i`` = ``(|S|/N)
    mean_S(dc_i)``: the sampled clients' mean model update and control update,
    the latter scaled by the fraction of the ``N`` clients that took part."""
    if not delta_y or len(delta_y) != len(delta_c):
        raise ValueError("need one model update and one control update per client")
    sampled = len(delta_y)
    new_x = {
        k: (v + server_lr * (sum(d[k] for d in delta_y) / sampled)).astype(v.dtype)
        for k, v in x.items()
    }
    new_c = {
        k: (v + sum(d[k] for d in delta_c) / num_clients).astype(v.dtype)
        for k, v in c.items()
    }
    return new_x, new_c
