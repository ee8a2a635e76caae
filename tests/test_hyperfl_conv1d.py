"""HyperFL-LPM on GPT-2's ``Conv1D`` (``fan_in_fan_out``): the generated LoRA
factors have PEFT's shapes and act as the merged plain model does, with the
update added to the ``d_in x d_out`` weight transposed."""

from __future__ import annotations

import torch
from torch import nn

from fedsim.core.loading import load_experiment
from fedsim.learn.data import DatasetInfo, federated_data


class Gpt2Classifier(nn.Module):
    """A one-block GPT-2 (its ``c_attn`` / ``c_proj`` are ``Conv1D``) over the
    8x8 digits quantised to 17 tokens, mean-pooled, and a private ``head``."""

    def __init__(self, info: DatasetInfo):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(
            vocab_size=17, n_embd=16, n_layer=1, n_head=2, n_positions=64
        )
        self.transformer = GPT2Model(config)
        self.head = nn.Linear(16, info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.flatten(1) * 16).round().long().clamp(0, 16)
        return self.head(self.transformer(input_ids=ids).last_hidden_state.mean(1))


def gpt2_classifier(cfg: object, info: DatasetInfo) -> nn.Module:
    return Gpt2Classifier(info)


LPM = (
    "strategy.name=hyperfl-lpm",
    "peft.method=lora",
    f"model.name={__name__}:gpt2_classifier",
    "peft.rank=2",
    'peft.targets=["c_attn", "c_proj"]',
    "federation.clients=2",
)


def test_lpm_generated_lora_on_conv1d_equals_the_merged_plain_model() -> None:
    """Generated A (r x d_in) and B (d_out x r) for c_attn (16 -> 48) and both
    c_proj (attention 16 -> 16, MLP 64 -> 16); the wrapped base's logits equal
    those of a plain copy whose Conv1D weights (d_in x d_out) got
    (alpha / r) (B A)^T."""
    from transformers.pytorch_utils import Conv1D

    from fedsim.clients.hyperfl import LpmClient
    from fedsim.learn.base import build_model
    from fedsim.learn.hypernet import lora_shapes
    from fedsim.learn.lora import lora_layout

    exp = load_experiment(None, list(LPM))
    data = federated_data(exp.data, exp.federation.clients, exp.seed)
    client = LpmClient(exp, data.info, torch.device("cpu"))
    plain = build_model(exp.model, data.info, exp.seed)
    layout = lora_layout(plain, exp.peft)
    assert set(layout.transposed) == set(layout.adapted) and len(layout.adapted) == 3
    assert set(client.model.hypernetwork.shapes) == set(lora_shapes(plain, exp.peft))
    scaling = exp.peft.alpha / exp.peft.rank
    expected = {
        "transformer.h.0.attn.c_attn": (16, 48),
        "transformer.h.0.attn.c_proj": (16, 16),
        "transformer.h.0.mlp.c_proj": (64, 16),
    }
    with torch.no_grad():
        client.model.embedding.normal_()
        generated = client.model.generate()
        for name, (d_in, d_out) in expected.items():
            a = generated[f"{name}.lora_A.default.weight"]
            b = generated[f"{name}.lora_B.default.weight"]
            assert a.shape == (2, d_in) and b.shape == (d_out, 2)
            assert b.abs().sum() > 0  # generated, not PEFT's zero start
            layer = plain.get_submodule(name)
            assert isinstance(layer, Conv1D) and layer.weight.shape == (d_in, d_out)
            layer.weight += scaling * (b @ a).T
        head = dict(client.model.target.named_parameters())
        plain.head.weight.copy_(head["head.weight"])
        plain.head.bias.copy_(head["head.bias"])
    x = torch.from_numpy(data.client(0).test.x[:4])
    client.model.eval(), plain.eval()
    torch.testing.assert_close(client.model(x), plain(x), rtol=1e-5, atol=1e-5)
