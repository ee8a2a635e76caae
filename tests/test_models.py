"""Models by name: shapes, named attention projections, no BatchNorm, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.core.errors import ConfigError
from fedsim.core.experiment import ModelConfig
from fedsim.learn.base import build_model
from fedsim.learn.data import DatasetInfo

IMAGE = DatasetInfo((1, 8, 8), 10)
TABLE = DatasetInfo((12,), 3)


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
def test_forward_shapes_and_no_batchnorm(name: str) -> None:
    model = build_model(ModelConfig(name=name), IMAGE, seed=0)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert isinstance(model.head, nn.Linear)
    assert not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_tabular_inputs(name: str) -> None:
    model = build_model(ModelConfig(name=name, hidden=16, heads=2), TABLE, seed=0)
    assert model(torch.zeros(4, 12)).shape == (4, 3)


def test_vit_attention_has_named_projections() -> None:
    model = build_model(ModelConfig(name="vit", depth=2), IMAGE, seed=0)
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "head"} <= names
    assert sum(n.endswith("attn.q_proj") for n, _ in model.named_modules()) == 2


def test_vit_attention_matches_torch_multihead_attention() -> None:
    """The hand-written attention equals nn.MultiheadAttention with the same weights."""
    from fedsim.learn.models import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(16, 4, dropout=0.0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        )
        ref.in_proj_bias.copy_(
            torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        )
        ref.out_proj.weight.copy_(attn.out_proj.weight)
        ref.out_proj.bias.copy_(attn.out_proj.bias)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(
        attn(x), ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6
    )


def test_initialisation_is_seeded() -> None:
    a = build_model(ModelConfig(name="cnn"), IMAGE, seed=1).state_dict()
    b = build_model(ModelConfig(name="cnn"), IMAGE, seed=1).state_dict()
    c = build_model(ModelConfig(name="cnn"), IMAGE, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cnn_rejects_tabular_data_and_vit_checks_patches() -> None:
    with pytest.raises(ConfigError, match="model.name: 'cnn' needs image data"):
        build_model(ModelConfig(name="cnn"), TABLE, seed=0)
    with pytest.raises(ConfigError, match="model.patch-size: 3 must divide"):
        build_model(ModelConfig(name="vit", patch_size=3), IMAGE, seed=0)
