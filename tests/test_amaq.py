"""AMAQ (adaptive mixed-bit activation quantization) against numpy oracles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.core.messages import ACTIVATIONS, CUT, GRADIENT
from fedsim.learn.amaq import (
    Amaq,
    AmaqGate,
    bit_penalty,
    bit_target,
    decode_arrays,
    encode_at,
    pack_channels,
    packed_nbytes,
    unpack_channels,
)
from tests.conftest import experiment, run_rounds

#: Tiny tensors: one torch thread (a second only adds contention).
pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_channels(x: np.ndarray) -> np.ndarray:
    """Oracle layout: channel axis 1 for 4-d, last otherwise, moved first."""
    axis = 1 if x.ndim == 4 else x.ndim - 1
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def test_packing_round_trips_with_the_size_the_bit_widths_imply() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(1, 9, size=11)
    n = 37
    q = np.stack([rng.integers(0, 2**k, size=n) for k in bits])
    packed = pack_channels(q, bits)
    assert packed.dtype == np.uint8
    assert packed.nbytes == math.ceil(n * bits.sum() / 8) == packed_nbytes(n, bits)
    np.testing.assert_array_equal(unpack_channels(packed, bits, n), q)


@pytest.mark.parametrize("shape", [(6, 10), (4, 5, 8), (3, 6, 4, 4)])
def test_error_is_bounded_per_channel_by_its_bit_width(shape) -> None:
    torch.manual_seed(0)
    axis = 1 if len(shape) == 4 else len(shape) - 1
    channels = shape[axis]
    spread = torch.linspace(0.1, 5.0, channels).reshape(
        [channels if d == axis else 1 for d in range(len(shape))]
    )
    x = torch.randn(shape) * spread
    bits = np.arange(channels) % 7 + 2  # 2..8 bits
    arrays = encode_at(x.numpy(), bits)
    x_hat = decode_arrays(arrays)
    assert x_hat.shape == x.shape
    rows, rows_hat = numpy_channels(x.numpy()), numpy_channels(x_hat)
    step = (rows.max(1) - rows.min(1)) / (2.0**bits - 1)
    error = np.abs(rows - rows_hat).max(1)
    assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-6)
    # Fewer bits, coarser: the 2-bit channels carry at most 4 distinct values.
    assert all(len(np.unique(rows_hat[c])) <= 2 ** bits[c] for c in range(channels))
    # Bytes on the wire: the packed integers the bits imply, 9 bytes per channel.
    n = rows.shape[1]
    assert arrays["packed"].nbytes == math.ceil(n * bits.sum() / 8)
    assert arrays["lo"].nbytes + arrays["scale"].nbytes + arrays["bits"].nbytes == (
        9 * channels
    )


def test_gate_forward_is_what_the_receiver_decodes_and_passes_gradients() -> None:
    torch.manual_seed(1)
    gate = AmaqGate(8, min_bits=2, max_bits=8, start_bits=5)
    with torch.no_grad():
        gate.gate.normal_()
    x = torch.randn(16, 8, requires_grad=True)
    local = gate(x)
    received = decode_arrays(encode_at(x.detach().numpy(), gate.wire_bits()))
    assert torch.equal(local.detach(), torch.from_numpy(received))
    upstream = torch.randn(16, 8)
    local.backward(upstream)
    assert torch.equal(x.grad, upstream)  # straight through to the activations
    assert gate.gate.grad is not None and torch.all(torch.isfinite(gate.gate.grad))
    assert gate.gate.grad.abs().sum() > 0


def test_bit_widths_anneal_over_a_run_and_bytes_follow_them() -> None:
    """A split MLP trained through the AMAQ cut: the mean wire bit width falls
    from about 8 towards about 4 round by round, and each round's bytes are
    what its bit widths imply."""
    torch.manual_seed(2)
    x = torch.randn(128, 10)
    y = (x[:, :3].sum(1) > 0).long()
    client, server = nn.Sequential(nn.Linear(10, 16), nn.ReLU()), nn.Linear(16, 2)
    gate = AmaqGate(16, min_bits=2, max_bits=8, start_bits=8)
    optimizer = torch.optim.SGD([*client.parameters(), *server.parameters()], lr=0.1)
    gate_optimizer = torch.optim.Adam(gate.parameters(), lr=0.1)
    rounds, steps = 6, 10
    means, sizes = [], []
    for r in range(rounds):
        for s in range(steps):
            target = bit_target(
                (r * steps + s + 1) / (rounds * steps), start_bits=8, end_bits=4
            )
            loss = F.cross_entropy(server(gate(client(x))), y)
            loss = loss + bit_penalty(gate.bits(), target, weight=10.0)
            optimizer.zero_grad()
            gate_optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            gate_optimizer.step()
        bits = gate.wire_bits()
        means.append(float(bits.mean()))
        sizes.append(encode_at(client(x).detach().numpy(), bits)["packed"].nbytes)
        assert sizes[-1] == math.ceil(128 * int(bits.sum()) / 8)
    assert means[0] >= 7.0
    assert all(b <= a for a, b in zip(means, means[1:], strict=False))
    assert means[-1] <= means[0] - 3
    assert 3.5 <= means[-1] <= 4.6
    assert sizes[-1] < 0.6 * sizes[0]


def test_the_budget_goes_to_the_channels_the_loss_needs() -> None:
    """Only channels 0 and 1 carry the regression target: under a tight mean
    budget the task loss keeps their bits above the others'."""
    torch.manual_seed(3)
    x = torch.randn(512, 8) * 3.0
    y = x[:, 0] - 2 * x[:, 1]
    weights = torch.tensor([1.0, -2.0, 0, 0, 0, 0, 0, 0])
    gate = AmaqGate(8, min_bits=2, max_bits=8, start_bits=6)
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.mse_loss(gate(x) @ weights, y) + bit_penalty(gate.bits(), 4.0, 10.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bits = gate.wire_bits()
    assert bits[:2].min() > bits[2:].max()
    assert abs(float(gate.bits().detach().mean()) - 4.0) < 0.3


def test_bit_target_runs_linearly_from_start_to_end() -> None:
    assert bit_target(0.0, start_bits=8, end_bits=4) == 8
    assert bit_target(0.5, start_bits=8, end_bits=4) == 6
    assert bit_target(1.0, start_bits=8, end_bits=4) == 4
    assert bit_target(2.0, start_bits=8, end_bits=4) == 4
    bits = torch.tensor([5.0, 7.0])
    assert bit_penalty(bits, 6.0, 3.0) == 0
    assert bit_penalty(bits, 5.0, 3.0) == pytest.approx(3.0)


def test_codec_learns_on_the_client_and_the_server_answers_at_its_bits() -> None:
    """The client's codec sends at its gate's bits; the server's codec decodes
    them and sends the gradient back at the same bits; the client's backward
    equals the oracle (gradient straight through to the segment, gate stepped
    by Adam on the received gradient plus the penalty); state/load resumes the
    same learner in another codec object."""
    torch.manual_seed(4)
    client, server = Amaq(min_bits=2, max_bits=8), Amaq(min_bits=2, max_bits=8)
    layer = nn.Linear(5, 6)
    x = torch.randn(12, 5)
    # First batch: no gate yet, start bits everywhere.
    up = client.encode(layer(x).detach().numpy())
    np.testing.assert_array_equal(up["bits"], np.full(6, 8))
    activations = server.decode(up)
    down = server.encode(np.ones_like(activations))
    np.testing.assert_array_equal(down["bits"], up["bits"])
    gradient = torch.randn(12, 6)
    oracle_gate = AmaqGate(6, min_bits=2, max_bits=8, start_bits=8)
    oracle_layer = nn.Linear(5, 6)
    oracle_layer.load_state_dict(layer.state_dict())
    oracle_adam = torch.optim.Adam(oracle_gate.parameters(), lr=0.2)
    for progress in (0.5, 0.9):
        out = layer(x)
        client.backward(out, gradient, progress=progress)
        target = bit_target(progress, start_bits=8, end_bits=4)
        oracle_adam.zero_grad()
        loss = (oracle_gate(oracle_layer(x)) * gradient).sum()
        (loss + bit_penalty(oracle_gate.bits(), target, 10.0)).backward()
        oracle_adam.step()
    assert client.gate is not None
    torch.testing.assert_close(client.gate.gate, oracle_gate.gate)
    torch.testing.assert_close(layer.weight.grad, oracle_layer.weight.grad)
    # Once the gate exists, encode uses its bits.
    sent = client.encode(layer(x).detach().numpy())
    np.testing.assert_array_equal(sent["bits"], oracle_gate.wire_bits())
    assert client.mean_sent_bits() == pytest.approx(
        (8.0 + float(oracle_gate.wire_bits().mean())) / 2
    )
    resumed = Amaq(min_bits=2, max_bits=8)
    resumed.load({k: v.numpy() for k, v in client.state().items()})
    for codec in (client, resumed):
        codec.backward(layer(x), gradient, progress=1.0)
    assert resumed.gate is not None
    torch.testing.assert_close(resumed.gate.gate, client.gate.gate)


def test_sfl_v1_with_amaq_sends_falling_bit_widths_at_their_real_size(
    task_identity: None, tmp_path: Path
) -> None:
    """SplitFed V1 with ``split.quantization = amaq``, through the real strategy
    and clients: the recorded mean bit width per round falls from about 8
    towards 4; every activation message's packed integers are exactly the size
    its bit widths imply; each gradient comes down at the bits its activations
    went up with."""
    exp = experiment(
        "sfl-v1", "split.quantization=amaq", "federation.clients=2", "rounds=4"
    )
    _, fake, recorder = run_rounds(exp, 4, tmp_path)
    means = [
        value
        for _, client, _, name, value in recorder.rows
        if client is None and name == "mean-bits"
    ]
    assert len(means) == 4
    assert means[0] >= 7.5 and means[-1] <= 5.0
    assert all(b < a for a, b in zip(means, means[1:], strict=False))
    sent_bits: dict[int, np.ndarray] = {}
    checked = 0
    for message, answer in fake.log:
        node = message.metadata.dst_node_id
        if CUT in message.content:  # a gradient down
            down = message.content.array_records[CUT]
            np.testing.assert_array_equal(
                down[f"{GRADIENT}.bits"].numpy(), sent_bits[node]
            )
        if CUT in answer.content and f"{ACTIVATIONS}.bits" in answer.content[CUT]:
            up = answer.content.array_records[CUT]
            bits = up[f"{ACTIVATIONS}.bits"].numpy()
            shape = up[f"{ACTIVATIONS}.shape"].numpy()
            n = int(np.prod(shape)) // len(bits)
            assert up[f"{ACTIVATIONS}.packed"].numpy().nbytes == math.ceil(
                n * int(bits.sum()) / 8
            )
            sent_bits[node] = bits
            checked += 1
    assert checked > 8


def test_bit_bounds_out_of_order_are_a_config_error() -> None:
    from fedsim.core.errors import ConfigError
    from fedsim.learn.base import build_model
    from fedsim.learn.data import federated_data
    from fedsim.strategies.split.server import check

    exp = experiment("sfl-v1", "split.min-bits=8", "split.max-bits=4")
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    with pytest.raises(ConfigError, match="split.min-bits"):
        check(exp, build_model(exp.model, data.info, exp.seed), data)
